//! sitelinkd's command line, without root: what it accepts before it touches a device.

use std::process::Command;

/// sitelinkd's complaint when started with no interface name and `var=value` in its
/// environment: the environment is parsed first, so a value it refuses is named here.
fn complaint(var: &str, value: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sitelinkd")).env(var, value).output().expect("sitelinkd runs");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn switches_from_the_environment_take_1_and_0_as_well_as_true_and_false() {
    for var in ["SITELINK_REALTIME", "SITELINK_NO_OFFLOAD"] {
        for value in ["1", "0", "true", "false", "yes", "no", "on", "off"] {
            let said = complaint(var, value);
            assert!(!said.contains("invalid value"), "{var}={value}: {said}");
            assert!(said.contains("required arguments were not provided"), "{var}={value}: {said}");
        }
        let said = complaint(var, "maybe");
        assert!(said.contains("invalid value 'maybe'"), "{var}=maybe: {said}");
    }
}

#[test]
fn real_time_is_the_default_and_can_be_turned_off_three_ways() {
    let complaint_with = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sitelinkd"))
            .args(args)
            .env_remove("SITELINK_REALTIME")
            .output()
            .expect("sitelinkd runs");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for args in [&["--realtime"][..], &["--realtime=false"], &["--realtime=0"], &["--no-realtime"]] {
        let said = complaint_with(args);
        assert!(said.contains("required arguments were not provided"), "{args:?}: {said}");
    }
    // `--realtime false` would take "false" for the interface's name: the value needs `=`.
    let said = complaint_with(&["--realtime=maybe"]);
    assert!(said.contains("invalid value 'maybe'"), "{said}");
    let help = Command::new(env!("CARGO_BIN_EXE_sitelinkd")).arg("--help").output().expect("sitelinkd runs");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--realtime[=<REALTIME>]") && help.contains("[default: true]"), "{help}");
}
