//! Roaming through the admin CLI of a running agent: the refusals, credentials that stay in
//! step with the source, and a user who logs in through the destination instance with the same
//! username and password and is counted there. Needs root.

use std::{path::Path, process::Command};

use sag_agent::{
    dataplane::PinnedCounters,
    testing::lab::{connected_address, ping, settle, Lab, COMPANY_NETWORK},
};
use serde_json::Value;

fn lab() -> Lab {
    Lab::start(Path::new(env!("CARGO_BIN_EXE_sag-agent")), 1).expect("lab starts (as root)")
}

/// Creates an instance in `area` with client block `block`, allowed to reach the company.
fn instance_in(lab: &Lab, area: &str, block: &str) -> String {
    let output = lab
        .admin(&["instance", "create", "--owner", "lab", "--area", area, "--quota", "5", "--json"])
        .unwrap();
    let id = serde_json::from_str::<Value>(&output).unwrap()[0]["id"].as_str().unwrap().to_owned();
    lab.admin(&["network", "set", &id, "--cidr-block", block, "--allow", COMPANY_NETWORK]).unwrap();
    id
}

/// Runs an admin command that must fail and returns its exit code and error output.
fn refused(lab: &Lab, args: &[&str]) -> (Option<i32>, String) {
    let socket = lab.socket();
    let output =
        Command::new(&lab.binary).args(args).arg("--socket").arg(&socket).output().unwrap();
    assert!(!output.status.success(), "{args:?} succeeded");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).trim().to_owned())
}

fn show(lab: &Lab, instance: &str, username: &str) -> Value {
    serde_json::from_str(&lab.admin(&["account", "show", instance, username, "--json"]).unwrap())
        .unwrap()
}

#[test]
fn roam_refusals_name_the_rule() {
    let lab = lab();
    let (source, _) = lab.create_instance().unwrap();
    let same_area = instance_in(&lab, "eu-central-1", "10.78.0.0/24");
    let other_area = instance_in(&lab, "cn-hangzhou", "10.79.0.0/24");
    lab.create_account(&source, "roamer-01", 512, None).unwrap();
    lab.create_account(&other_area, "roamer-01", 512, None).unwrap();

    let (code, error) =
        refused(&lab, &["account", "roam", &source, "roamer-01", "--to", &same_area]);
    assert_eq!(code, Some(3));
    assert_eq!(
        error,
        format!(
            "error: invalid to \"{same_area}\": must be an instance in another area: {source} \
             and {same_area} both serve eu-central-1"
        )
    );
    let (code, error) =
        refused(&lab, &["account", "roam", &source, "roamer-01", "--to", &other_area]);
    assert_eq!(code, Some(5));
    assert_eq!(
        error,
        format!(
            "error: cannot roam to {other_area}: username \"roamer-01\" is already an account \
             of that instance"
        )
    );
    let (code, error) =
        refused(&lab, &["account", "roam", &source, "nobody-01", "--to", &other_area]);
    assert_eq!(code, Some(4));
    assert!(error.contains("not found"), "{error}");
    // Two instances of one box never have overlapping blocks (the box keys clients by
    // address), so the overlap rule is covered by the unit test of `roaming::check_roam`.
    let (_, error) =
        refused(&lab, &["network", "set", &other_area, "--cidr-block", "10.77.0.128/25"]);
    assert!(error.contains("overlaps"), "{error}");

    // A quota-full destination, and a replica of a replica.
    let third = instance_in(&lab, "me-east-1", "10.80.0.0/24");
    for n in 0..5 {
        lab.create_account(&third, &format!("filler-{n:02}"), 512, None).unwrap();
    }
    let (code, error) = refused(&lab, &["account", "roam", &source, "roamer-01", "--to", &third]);
    assert_eq!(code, Some(5));
    assert_eq!(
        error,
        format!("error: cannot roam to {third}: its account quota is full (5 of 5 accounts)")
    );
    lab.create_account(&source, "roamer-02", 512, None).unwrap();
    let fourth = instance_in(&lab, "us-west-1", "10.81.0.0/24");
    lab.admin(&["account", "roam", &source, "roamer-02", "--to", &fourth]).unwrap();
    let (code, error) =
        refused(&lab, &["account", "roam", &fourth, "roamer-02", "--to", &other_area]);
    assert_eq!(code, Some(5));
    assert!(error.contains(&format!("is itself a replica of the account on {source}")), "{error}");
    let (code, error) = refused(&lab, &["account", "reset-password", &fourth, "roamer-02"]);
    assert_eq!(code, Some(5));
    assert!(error.contains("reset the password there"), "{error}");

    // Deleting the source deletes its replica with it.
    let output = lab.admin(&["account", "delete", &source, "roamer-02", "--json"]).unwrap();
    let reply: Value = serde_json::from_str(&output).unwrap();
    assert_eq!(reply["replicas_deleted"][0], fourth.as_str());
    let (code, _) = refused(&lab, &["account", "show", &fourth, "roamer-02"]);
    assert_eq!(code, Some(4));
}

#[test]
fn replica_logs_in_at_the_destination_and_is_counted_there() {
    let lab = lab();
    let (source, fingerprint) = lab.create_instance().unwrap();
    let destination = instance_in(&lab, "cn-hangzhou", "10.78.0.0/24");
    lab.create_account(&source, "traveller1", 512, None).unwrap();
    let output =
        lab.admin(&["account", "roam", &source, "traveller1", "--to", &destination]).unwrap();
    assert_eq!(
        output.trim(),
        format!(
            "replicated account traveller1 of instance {source} to instance {destination}: it \
             logs in there with the same password"
        )
    );
    assert_eq!(show(&lab, &source, "traveller1")["roaming"]["replicas"][0], destination.as_str());
    assert_eq!(show(&lab, &destination, "traveller1")["roaming"]["replica_of"], source.as_str());

    // The same username and password, through the destination instance.
    let line = lab.connect(0, &fingerprint, &destination, "traveller1").unwrap();
    let address = connected_address(&line).unwrap();
    assert!(line.contains(&format!("instance {destination}, via 203.0.113.1:51821")), "{line}");
    assert!("10.78.0.0/24".parse::<ipnet::Ipv4Net>().unwrap().contains(&address), "{address}");
    let replies = ping(&lab.users[0], 3, 100).unwrap();
    assert!(replies > 0, "no reply to 3 echo requests through the destination instance");
    settle();
    let counted = lab.counters(address).unwrap().expect("the address is a client in the kernel");
    assert_eq!((counted.rx_packets, counted.rx_bytes, counted.tx_bytes), (3, 3 * 128, 3 * 128));
    let destination_number: u32 = serde_json::from_str::<Value>(
        &lab.admin(&["instance", "show", &destination, "--json"]).unwrap(),
    )
    .unwrap()["instance"]["kernel_number"]
        .as_u64()
        .unwrap()
        .try_into()
        .unwrap();
    let pinned = PinnedCounters::open(&lab.pin_dir).unwrap();
    assert_eq!(pinned.client_record(address).unwrap().unwrap().instance, destination_number);
    lab.disconnect(0).unwrap();

    // Credentials stay in step: a new password on the source logs in at the destination,
    // the old one no longer does, and disabling the source disables the replica.
    std::fs::write(lab.dir.join("new.password"), "Fresh_pass_2027\n").unwrap();
    let new_password = lab.dir.join("new.password").display().to_string();
    lab.admin(&[
        "account",
        "reset-password",
        &source,
        "traveller1",
        "--password-file",
        &new_password,
    ])
    .unwrap();
    std::fs::copy(lab.dir.join("new.password"), lab.dir.join("traveller1.password")).unwrap();
    lab.connect(0, &fingerprint, &destination, "traveller1").unwrap();
    lab.disconnect(0).unwrap();
    lab.admin(&["account", "disable", &source, "traveller1"]).unwrap();
    assert_eq!(show(&lab, &destination, "traveller1")["enabled"], false);
    let error = lab.connect(0, &fingerprint, &destination, "traveller1").unwrap_err().to_string();
    assert!(
        error.contains(&format!("account traveller1 of instance {destination} is disabled")),
        "{error}"
    );
    lab.admin(&["account", "enable", &source, "traveller1"]).unwrap();
    assert_eq!(show(&lab, &destination, "traveller1")["enabled"], true);
}
