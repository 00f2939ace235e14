//! Test fixture: a plugin that claims ABI version 999.

#[no_mangle]
pub extern "C" fn fusechat_abi_version() -> u32 {
    999
}

/// Never called: the host stops at the version check.
#[no_mangle]
pub extern "C" fn fusechat_plugin_register(_registrar: *const u8) -> i32 {
    std::process::abort()
}
