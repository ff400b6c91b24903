//! Every kept input (`fuzz/corpus/<target>/*`: seeds, the minimised corpus, crash regressions)
//! runs through its target's body on the stable toolchain, without libFuzzer.

use std::path::Path;

use nsq_sansio::fuzzing::{run, TARGETS};

#[test]
fn every_kept_input_passes_its_target() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for target in TARGETS {
        let dir = corpus.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no kept inputs for {target}");
        for file in files {
            let data = std::fs::read(&file).unwrap();
            let result = std::panic::catch_unwind(|| run(target, &data));
            assert!(matches!(result, Ok(true)), "{target} fails on {}", file.display());
        }
    }
}
