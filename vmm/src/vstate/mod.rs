//! KVM state: the VM (memory slots, irqchip, PIT) and its vCPUs (boot state, run loop, threads).

pub mod vcpu;
pub mod vm;

/// How many times an ioctl interrupted by a signal is tried again before its EINTR is returned.
const EINTR_RETRIES: usize = 1000;

/// Runs a KVM ioctl, again while it fails with EINTR. A signal that lands while KVM sets up
/// (SIGUSR1 for a report, the kicks and stops of job control) interrupts calls such as
/// KVM_CREATE_VM that have nothing to undo; the call is safe to repeat and must not fail the
/// build.
pub fn retry_interrupted<T>(
    mut ioctl: impl FnMut() -> Result<T, kvm_ioctls::Error>,
) -> Result<T, kvm_ioctls::Error> {
    let mut tries = 0;
    loop {
        match ioctl() {
            Err(e) if e.errno() == libc::EINTR && tries < EINTR_RETRIES => tries += 1,
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_ioctl_is_tried_again_and_other_errors_are_returned() {
        let mut calls = 0;
        let result = retry_interrupted(|| {
            calls += 1;
            if calls < 3 {
                Err(kvm_ioctls::Error::new(libc::EINTR))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(result.unwrap(), 3);

        let mut calls = 0;
        let result: Result<(), _> = retry_interrupted(|| {
            calls += 1;
            Err(kvm_ioctls::Error::new(libc::EINVAL))
        });
        assert_eq!(result.unwrap_err().errno(), libc::EINVAL);
        assert_eq!(calls, 1);

        let mut calls = 0;
        let result: Result<(), _> = retry_interrupted(|| {
            calls += 1;
            Err(kvm_ioctls::Error::new(libc::EINTR))
        });
        assert_eq!(result.unwrap_err().errno(), libc::EINTR);
        assert_eq!(calls, EINTR_RETRIES + 1);
    }
}
