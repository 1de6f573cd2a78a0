//! KVM tests with tiny guest programs written as machine code: fast even on nested-PVM hosts,
//! because only a handful of instructions run.
//!
//! They drive the vmm library in-process. They need /dev/kvm: without it they pass with a note,
//! except under CI (`CI` set), where a missing /dev/kvm is a failure.

use std::sync::{Arc, Mutex};

use devices::legacy::{EventFdTrigger, SerialConsole, I8042};
use devices::{Bus, BusDevice};
use kiln_tests::kvm_available;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::boot_params::{build_zero_page, write_zero_page, ZeroPageInputs};
use vmm::arch::x86_64::layout::{BOOT_STACK_POINTER, PML4_ADDR, ZERO_PAGE_ADDR};
use vmm::arch::x86_64::regs::{EntryPoint, PVH_INFO_ADDR};
use vmm::arch::StateCaps;
use vmm::memory::create_guest_memory;
use vmm::vstate::vcpu::{Vcpu, VcpuError, VcpuEvent};
use vmm::vstate::vm::{open_kvm, Vm};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const CODE_ADDR: u64 = 0x10_0000;
const REPORT_PORT: u16 = 0x1234;
const MMIO_TEST_ADDR: u64 = 0xd000_0000;

/// Collects 32-bit values the guest writes to `REPORT_PORT`.
#[derive(Default)]
struct Reporter {
    values: Vec<u32>,
}

impl BusDevice for Reporter {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        bytes[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
        self.values.push(u32::from_le_bytes(bytes));
    }
}

/// A 4-byte register that reads back what was last written.
#[derive(Default)]
struct Scratch {
    value: [u8; 4],
    writes: usize,
}

impl BusDevice for Scratch {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let n = data.len().min(4);
        data[..n].copy_from_slice(&self.value[..n]);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let n = data.len().min(4);
        self.value[..n].copy_from_slice(&data[..n]);
        self.writes += 1;
    }
}

struct TinyGuest {
    // Kept alive for the vCPU.
    vm: Vm,
    vcpu: Vcpu,
    mem: devices::GuestMemoryMmap,
}

fn tiny_guest(code: &[u8], entry: EntryPoint, io_bus: Bus, mmio_bus: Bus) -> TinyGuest {
    let kvm = open_kvm().unwrap();
    let mem = create_guest_memory(16 << 20).unwrap();
    mem.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
    let params = build_zero_page(&ZeroPageInputs {
        setup_header: None,
        cmdline_addr: 0x20000,
        cmdline_len: 0,
        initrd: None,
        mem_size: 16 << 20,
    })
    .unwrap();
    write_zero_page(&mem, &params).unwrap();
    let mut vm = Vm::new(&kvm).unwrap();
    vm.register_memory(&mem, true).unwrap();
    vm.create_irqchip().unwrap();
    let caps = Arc::new(StateCaps::of(&kvm).unwrap());
    let vcpu = Vcpu::new(&vm, 0, io_bus, mmio_bus, mem.clone(), caps).unwrap();
    vcpu.configure(&kvm, 1, entry).unwrap();
    TinyGuest { vm, vcpu, mem }
}

/// Runs until `done` says so, at most `max_exits` exits.
fn run_until(vcpu: &mut Vcpu, max_exits: usize, mut done: impl FnMut() -> bool) {
    for _ in 0..max_exits {
        if done() {
            return;
        }
        match vcpu.run_once() {
            Ok(VcpuEvent::Handled) | Ok(VcpuEvent::Interrupted) => {}
            other => panic!("guest stopped early: {other:?}"),
        }
    }
    panic!("guest did not finish within {max_exits} exits");
}

/// A tiny guest whose writes to `REPORT_PORT` are collected; runs until it has reported `count`
/// values and returns them.
fn run_reporting_guest(
    code: &[u8],
    entry: EntryPoint,
    mmio_bus: Bus,
    count: usize,
) -> (TinyGuest, Vec<u32>) {
    let reporter = Arc::new(Mutex::new(Reporter::default()));
    let mut io_bus = Bus::new();
    io_bus
        .insert(reporter.clone(), u64::from(REPORT_PORT), 1)
        .unwrap();
    let mut guest = tiny_guest(code, entry, io_bus, mmio_bus);
    run_until(&mut guest.vcpu, 100, || {
        reporter.lock().unwrap().values.len() == count
    });
    let values = reporter.lock().unwrap().values.clone();
    (guest, values)
}

#[test]
fn long_mode_entry_has_the_boot_protocol_state() {
    if !kvm_available() {
        return;
    }
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x66, 0xba, 0x34, 0x12,             // mov dx, 0x1234
        0x89, 0xf0, 0xef,                   // mov eax, esi; out dx, eax
        0x89, 0xe0, 0xef,                   // mov eax, esp; out
        0x0f, 0x20, 0xc0, 0xef,             // mov rax, cr0; out
        0x0f, 0x20, 0xd8, 0xef,             // mov rax, cr3; out
        0x0f, 0x20, 0xe0, 0xef,             // mov rax, cr4; out
        // movabs rax, 1 << 32; shr rax, 32; out: only 64-bit code gets 1 here.
        // (Not rdmsr EFER: on nested-PVM hosts a CPL-0 RDMSR never returns.)
        0x48, 0xb8, 0, 0, 0, 0, 1, 0, 0, 0,
        0x48, 0xc1, 0xe8, 0x20, 0xef,
        0x31, 0xc0, 0x8c, 0xc8, 0xef,       // xor eax, eax; mov eax, cs; out
        0x31, 0xc0, 0x8c, 0xd0, 0xef,       // xor eax, eax; mov eax, ss; out
        0x9c, 0x58, 0xef,                   // pushfq; pop rax; out
        0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, // mov eax, [rsi + 0x202]
        0xef,                               // out
        0xf4, 0xeb, 0xfd,                   // hlt; jmp hlt
    ];
    let (_guest, v) = run_reporting_guest(code, EntryPoint::Linux64(CODE_ADDR), Bus::new(), 10);
    assert_eq!(v[0] as u64, ZERO_PAGE_ADDR, "rsi points at the zero page");
    assert_eq!(v[1] as u64, BOOT_STACK_POINTER, "rsp");
    assert_eq!(v[2] & 0x8000_0001, 0x8000_0001, "CR0.PG and CR0.PE");
    assert_eq!(v[3] as u64, PML4_ADDR, "CR3");
    assert_ne!(v[4] & 0x20, 0, "CR4.PAE");
    assert_eq!(v[5], 1, "64-bit code runs: long mode is active");
    assert_eq!(v[6], 0x08, "CS is the boot code segment");
    assert_eq!(v[7], 0x10, "SS is the boot data segment");
    assert_eq!(v[8] & 0x200, 0, "interrupts disabled");
    assert_eq!(v[9], 0x5372_6448, "the zero page says HdrS");
}

#[test]
fn serial_output_and_i8042_reset() {
    if !kvm_available() {
        return;
    }
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'O', 0xee,       // mov al, 'O'; out dx, al
        0xb0, b'K', 0xee,       // mov al, 'K'; out dx, al
        0xb0, b'\n', 0xee,      // mov al, '\n'; out dx, al
        0xe4, 0x64,             // in al, 0x64 (status: i8042 ready)
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al  (CPU reset)
        0xf4, 0xeb, 0xfd,       // hlt; jmp hlt
    ];
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let reset = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut io_bus = Bus::new();
    io_bus
        .insert(
            Arc::new(Mutex::new(SerialConsole::new(
                EventFdTrigger::new(irq),
                Box::new(sink.clone()),
                devices::legacy::OutputLimits::default(),
            ))),
            0x3f8,
            8,
        )
        .unwrap();
    io_bus
        .insert(
            Arc::new(Mutex::new(I8042::new(
                EventFdTrigger::new(reset.try_clone().unwrap()),
                EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            ))),
            0x60,
            5,
        )
        .unwrap();
    let mut guest = tiny_guest(code, EntryPoint::Linux64(CODE_ADDR), io_bus, Bus::new());
    run_until(&mut guest.vcpu, 100, || reset.read().is_ok());
    assert_eq!(&*sink.0.lock().unwrap(), b"OK\n");
}

#[test]
fn triple_fault_is_a_fatal_exit_with_rip_and_bytes() {
    if !kvm_available() {
        return;
    }
    // Read beyond the identity-mapped first GiB: #PF with no usable IDT → #DF → triple fault.
    let code: &[u8] = &[0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x40, 0xf4];
    let mut guest = tiny_guest(code, EntryPoint::Linux64(CODE_ADDR), Bus::new(), Bus::new());
    let mut result = None;
    for _ in 0..100 {
        match guest.vcpu.run_once() {
            Ok(VcpuEvent::Handled) | Ok(VcpuEvent::Interrupted) => {}
            other => {
                result = Some(other);
                break;
            }
        }
    }
    let Some(Err(VcpuError::Fatal(exit))) = result else {
        panic!("expected a fatal exit, got {result:?}");
    };
    assert!(
        exit.reason.contains("SHUTDOWN") || exit.reason.contains("INTERNAL_ERROR"),
        "{exit}"
    );
    assert_eq!(exit.rip, Some(CODE_ADDR), "{exit}");
    let bytes = exit.instruction.clone().expect("instruction bytes");
    assert_eq!(&bytes[..8], &code[..8], "{exit}");
}

#[test]
fn pvh_entry_and_mmio_dispatch() {
    if !kvm_available() {
        return;
    }
    // 32-bit protected mode, paging off: the MMIO gap is directly addressable.
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x66, 0xba, 0x34, 0x12,                   // mov dx, 0x1234
        0x89, 0xd8, 0xef,                         // mov eax, ebx (start info); out dx, eax
        0xb9, 0x00, 0x00, 0x00, 0xd0,             // mov ecx, 0xd0000000
        0xc7, 0x01, 0x78, 0x56, 0x34, 0x12,       // mov dword [ecx], 0x12345678
        0x8b, 0x01, 0xef,                         // mov eax, [ecx]; out dx, eax
        0x8b, 0x81, 0x00, 0x10, 0x00, 0x00, 0xef, // mov eax, [ecx + 0x1000] (unclaimed); out
        0xf4, 0xeb, 0xfd,                         // hlt; jmp hlt
    ];
    let scratch = Arc::new(Mutex::new(Scratch::default()));
    let mut mmio_bus = Bus::new();
    mmio_bus
        .insert(scratch.clone(), MMIO_TEST_ADDR, 0x1000)
        .unwrap();
    let (guest, v) = run_reporting_guest(code, EntryPoint::Pvh(CODE_ADDR), mmio_bus, 3);

    assert_eq!(v[0] as u64, PVH_INFO_ADDR, "rbx points at the start info");
    assert_eq!(v[1], 0x1234_5678, "MMIO read back through the bus");
    assert_eq!(v[2], 0xffff_ffff, "an unclaimed MMIO read floats high");
    assert_eq!(scratch.lock().unwrap().writes, 1);
    let sample = guest.vcpu.sample();
    assert_eq!(sample.exits.mmio_write, 1);
    assert_eq!(sample.exits.unclaimed, 1);
}

#[test]
fn boot_timer_sees_the_guests_write_at_its_address() {
    if !kvm_available() {
        return;
    }
    use devices::legacy::{BootTimer, BOOT_TIMER_LEN};
    use vmm::arch::x86_64::layout::BOOT_TIMER_ADDR;
    // 32-bit protected mode, paging off: 0xc0000000 is directly addressable.
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xb9, 0x00, 0x00, 0x00, 0xc0, // mov ecx, 0xc0000000
        0xc6, 0x01, 0x7a,             // mov byte [ecx], 122 (not the magic byte: ignored)
        0xc6, 0x01, 0x7b,             // mov byte [ecx], 123
        0x66, 0xba, 0x34, 0x12,       // mov dx, 0x1234
        0xef,                         // out dx, eax (done)
        0xf4, 0xeb, 0xfd,             // hlt; jmp hlt
    ];
    let timer = Arc::new(Mutex::new(BootTimer::new()));
    let mut mmio_bus = Bus::new();
    mmio_bus
        .insert(timer.clone(), BOOT_TIMER_ADDR, BOOT_TIMER_LEN)
        .unwrap();
    let (guest, _) = run_reporting_guest(code, EntryPoint::Pvh(CODE_ADDR), mmio_bus, 1);
    let reported = timer.lock().unwrap().reported();
    assert!(reported.is_some(), "the guest's 123 reached the boot timer");
    assert_eq!(guest.vcpu.sample().exits.mmio_write, 2);
}

/// A guest that counts in a register and in memory, saved after its third report (vCPU, VM and
/// memory, through the snapshot code) and restored into a new VM: the new VM goes on counting
/// from 4, which it can only do if the registers, the memory and the instruction pointer past
/// the last port write all came back.
#[test]
fn a_saved_vcpu_goes_on_where_it_stopped_in_a_new_vm() {
    if !kvm_available() {
        return;
    }
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x66, 0xba, 0x34, 0x12,                   // mov dx, 0x1234
        0x31, 0xdb,                               // xor ebx, ebx
        0xff, 0xc3,                               // loop: inc ebx
        0x89, 0x1c, 0x25, 0x00, 0x20, 0x00, 0x00, // mov [0x2000], ebx
        0x89, 0xd8, 0xef,                         // mov eax, ebx; out dx, eax
        0xeb, 0xf2,                               // jmp loop
    ];
    let (mut guest, values) =
        run_reporting_guest(code, EntryPoint::Linux64(CODE_ADDR), Bus::new(), 3);
    assert_eq!(values, [1, 2, 3]);
    // KVM logged the guest's write to the counter's page (page 2 of the first region).
    let dirty = guest.vm.take_dirty_log(&guest.mem).unwrap();
    assert_ne!(dirty[0][0] & (1 << 2), 0, "dirty log {:x?}", &dirty[0][..1]);
    let vcpu_state = guest.vcpu.save().unwrap();
    let vm_state = vmm::arch::save_vm(guest.vm.fd()).unwrap();
    let dir = kiln_tests::scratch_dir("kvm-snapshot");
    let mem_path = dir.join("mem");
    let layout =
        vmm::persist::memory::save(&guest.mem, &mem_path, vmm::persist::memory::Pages::All)
            .unwrap();
    drop(guest);

    let kvm = open_kvm().unwrap();
    let mem = vmm::persist::memory::restore_from_file(&mem_path, &layout).unwrap();
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 3);
    let mut vm = Vm::new(&kvm).unwrap();
    vm.register_memory(&mem, false).unwrap();
    vm.create_irqchip().unwrap();
    let reporter = Arc::new(Mutex::new(Reporter::default()));
    let mut io_bus = Bus::new();
    io_bus
        .insert(reporter.clone(), u64::from(REPORT_PORT), 1)
        .unwrap();
    let caps = Arc::new(StateCaps::of(&kvm).unwrap());
    let mut vcpu = Vcpu::new(&vm, 0, io_bus, Bus::new(), mem.clone(), caps).unwrap();
    vcpu.restore(&vcpu_state).unwrap();
    vmm::arch::restore_vm(vm.fd(), &vm_state, false).unwrap();
    run_until(&mut vcpu, 100, || {
        reporter.lock().unwrap().values.len() == 2
    });
    assert_eq!(reporter.lock().unwrap().values, [4, 5]);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 5);
    // The memory file is the snapshot's: the restored VM's writes stayed private.
    let again = vmm::persist::memory::restore_from_file(&mem_path, &layout).unwrap();
    assert_eq!(again.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}
