//! See tests/props/requests.rs for the input layout and the properties checked.
#![no_main]

#[path = "../../tests/props/mod.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::requests::check(data));
