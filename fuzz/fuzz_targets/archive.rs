//! The adapter archive reader on arbitrary tar bytes (gzipped here, so the
//! fuzzer explores tar structure, not gzip's): GNU long names and links,
//! PAX headers, links, odd paths and sizes must be refused with an error,
//! never a panic or an allocation the size of what a header declares.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use lifelora::lora::archive::unpack_peft;

fuzz_target!(|data: &[u8]| {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    if gz.write_all(data).is_err() {
        return;
    }
    let Ok(archive) = gz.finish() else { return };
    let _ = unpack_peft(&archive, 1 << 20);
    // The bytes as a gzip stream themselves.
    let _ = unpack_peft(data, 1 << 20);
});
