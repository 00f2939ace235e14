//! Test fixture: the right ABI version, but no registration entry point.

#[no_mangle]
pub extern "C" fn fusechat_abi_version() -> u32 {
    1
}
