#[no_mangle]
pub extern "C" fn qvshim_api_version() -> i32 { 1 }
