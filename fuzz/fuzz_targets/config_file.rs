//! `kiln --config-file`: the JSON of `GET /vm/config` into resources (each part validated as its
//! `PUT` would be), then the VM configuration the build would start from. Also checks that what
//! Kiln reports back for an accepted file (`GET /vm/config`) is itself an accepted config file
//! describing the same resources, which the Kata flow (boot, read the config, boot it again)
//! relies on.
//!
//! Input: the file's bytes (not UTF-8 is refused as reading the file would).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::config::HostLimits;
use vmm::resources::VmResources;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(resources) = VmResources::from_config_json(text) else {
        return;
    };
    let reported =
        serde_json::to_string(&resources.full_config()).expect("GET /vm/config serializes");
    match VmResources::from_config_json(&reported) {
        Ok(again) => assert_eq!(again, resources, "GET /vm/config: {reported}"),
        Err(e) => panic!("GET /vm/config is not a valid config file ({e}): {reported}"),
    }
    let limits = HostLimits {
        max_vcpus: 32,
        mem_mib: 64 * 1024,
    };
    let _ = resources.vm_config(limits);
});
