//! Every fuzz target for a few seconds (the committed `scripts/fuzz.sh` runs each for ten
//! minutes): no input may panic or hang a reader.

use std::time::Duration;

#[test]
fn every_target_survives_a_few_seconds_of_mutated_input() {
    for target in recall_fuzz::targets() {
        let report = recall_fuzz::fuzz(&target, Duration::from_secs(3), 1);
        assert!(report.execs > 20, "{report}: too few inputs ran to mean anything");
        let crashes: Vec<&String> = report.crashes.iter().map(|(m, _)| m).collect();
        assert!(crashes.is_empty(), "{report}: {crashes:?}");
        assert!(report.hangs.is_empty(), "{report}");
    }
}
