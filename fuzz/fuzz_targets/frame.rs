#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(_)) = nsq_sansio::decode(&mut buf, 1 << 20) {}
});
