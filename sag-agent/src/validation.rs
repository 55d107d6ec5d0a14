//! The field rules of instances, network configurations and client accounts, each limit a
//! named constant, and errors that name the field, the rule and the value.

use std::{fmt, net::Ipv4Addr};

use ipnet::Ipv4Net;
use sag_common::policy::{MAX_ACCOUNT_BANDWIDTH_KBPS, MAX_BOX_BANDWIDTH_KBPS, MIN_BANDWIDTH_KBPS};

/// Prefix of every instance ID.
pub const INSTANCE_ID_PREFIX: &str = "sag-";
/// Number of lowercase letters and digits after the prefix of an instance ID.
pub const INSTANCE_ID_SUFFIX_LEN: usize = 16;
/// Minimum client accounts an instance can be bought for.
pub const MIN_ACCOUNT_QUOTA: u32 = 5;
/// Maximum client accounts an instance can be bought for.
pub const MAX_ACCOUNT_QUOTA: u32 = 1_000;
/// Minimum length of CCN or CEN name, in characters.
pub const MIN_NETWORK_NAME_LEN: usize = 2;
/// Maximum length of CCN or CEN name, in characters.
pub const MAX_NETWORK_NAME_LEN: usize = 100;
/// Minimum number of private CIDR blocks of an instance.
pub const MIN_CIDR_BLOCKS: usize = 1;
/// Maximum number of private CIDR blocks of an instance.
pub const MAX_CIDR_BLOCKS: usize = 5;
/// Maximum prefix length of a client CIDR block: a /30 still has two usable host addresses.
pub const MAX_CIDR_PREFIX_LEN: u8 = 30;
/// Minimum length of username, in characters.
pub const MIN_USERNAME_LEN: usize = 7;
/// Maximum length of username, in characters.
pub const MAX_USERNAME_LEN: usize = 33;
/// Minimum length of email address, in characters.
pub const MIN_EMAIL_LEN: usize = 2;
/// Maximum length of email address, in characters.
pub const MAX_EMAIL_LEN: usize = 64;
/// Minimum length of password, in characters.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Maximum length of password, in characters.
pub const MAX_PASSWORD_LEN: usize = 32;
/// Bandwidth of an account created without one, in kbit/s.
pub const DEFAULT_BANDWIDTH_KBPS: u32 = MAX_ACCOUNT_BANDWIDTH_KBPS;
/// Minimum length of area name, in characters.
pub const MIN_AREA_LEN: usize = 2;
/// Maximum length of area name, in characters.
pub const MAX_AREA_LEN: usize = 64;

/// The private IPv4 ranges of RFC 1918, which client blocks must lie in.
pub const PRIVATE_RANGES: [(Ipv4Addr, u8); 3] = [
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
];

/// A value that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The field, as the CLI and API name it (`username`, `cidr_blocks`).
    pub field: &'static str,
    /// The rule, as a sentence fragment ("must be 7 to 33 characters").
    pub rule: String,
    /// The value given, or a description of it for secrets.
    pub value: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {}: {}", self.field, self.value, self.rule)
    }
}

impl std::error::Error for ValidationError {}

fn invalid(
    field: &'static str,
    rule: impl Into<String>,
    value: impl fmt::Display,
) -> ValidationError {
    ValidationError { field, rule: rule.into(), value: value.to_string() }
}

/// Quotes a value for an error message.
fn quoted(value: &str) -> String {
    format!("{value:?}")
}

/// Pricing zone of an area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Zone {
    /// Areas whose name starts with `cn-`.
    MainlandChina,
    /// `me-east-1`.
    Dubai,
    /// Every other area.
    International,
}

impl Zone {
    /// Returns the zone an area is priced in.
    pub fn of_area(area: &str) -> Self {
        if area.starts_with("cn-") {
            Self::MainlandChina
        } else if area == "me-east-1" {
            Self::Dubai
        } else {
            Self::International
        }
    }
}

/// Checks an instance ID: `sag-` and 16 lowercase letters and digits.
pub fn instance_id(value: &str) -> Result<(), ValidationError> {
    let rule = format!(
        "must be {INSTANCE_ID_PREFIX} followed by {INSTANCE_ID_SUFFIX_LEN} lowercase letters and digits"
    );
    let suffix = value
        .strip_prefix(INSTANCE_ID_PREFIX)
        .ok_or_else(|| invalid("instance_id", &rule, quoted(value)))?;
    let well_formed = suffix.len() == INSTANCE_ID_SUFFIX_LEN
        && suffix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !well_formed {
        return Err(invalid("instance_id", rule, quoted(value)));
    }
    Ok(())
}

/// Checks an area name such as `cn-hangzhou`: lowercase letters, digits and `-`, starting with
/// a letter.
pub fn area(value: &str) -> Result<(), ValidationError> {
    let length = value.chars().count();
    if !(MIN_AREA_LEN..=MAX_AREA_LEN).contains(&length) {
        return Err(invalid(
            "area",
            format!("must be {MIN_AREA_LEN} to {MAX_AREA_LEN} characters, not {length}"),
            quoted(value),
        ));
    }
    let first_is_letter = value.starts_with(|c: char| c.is_ascii_lowercase());
    let charset = value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !first_is_letter || !charset {
        return Err(invalid(
            "area",
            "must be lowercase letters, digits and '-', starting with a letter (e.g. cn-hangzhou)",
            quoted(value),
        ));
    }
    Ok(())
}

/// Checks an instance's account quota: 5 to 1,000.
pub fn account_quota(value: u32) -> Result<(), ValidationError> {
    if !(MIN_ACCOUNT_QUOTA..=MAX_ACCOUNT_QUOTA).contains(&value) {
        return Err(invalid(
            "account_quota",
            format!("must be {MIN_ACCOUNT_QUOTA} to {MAX_ACCOUNT_QUOTA} accounts"),
            value,
        ));
    }
    Ok(())
}

/// Returns whether `c` is a Chinese character: a CJK unified ideograph, including the
/// extension blocks and compatibility ideographs.
fn is_chinese(c: char) -> bool {
    matches!(c as u32,
        0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2A6DF | 0x2A700..=0x2EBEF
            | 0x30000..=0x3134F)
}

/// Checks a CCN or CEN name: 2 to 100 characters; letters, Chinese characters, digits, `_`
/// and `-`; starting with a letter or a Chinese character. `field` names which one.
pub fn network_name(field: &'static str, value: &str) -> Result<(), ValidationError> {
    let length = value.chars().count();
    if !(MIN_NETWORK_NAME_LEN..=MAX_NETWORK_NAME_LEN).contains(&length) {
        return Err(invalid(
            field,
            format!(
                "must be {MIN_NETWORK_NAME_LEN} to {MAX_NETWORK_NAME_LEN} characters, not {length}"
            ),
            quoted(value),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || is_chinese(c) || c == '_' || c == '-'))
    {
        return Err(invalid(
            field,
            format!(
                "may contain only letters, Chinese characters, digits, '_' and '-', not {bad:?}"
            ),
            quoted(value),
        ));
    }
    if !value.starts_with(|c: char| c.is_ascii_alphabetic() || is_chinese(c)) {
        return Err(invalid(
            field,
            "must start with a letter or a Chinese character",
            quoted(value),
        ));
    }
    Ok(())
}

/// Checks a username: 7 to 33 characters; letters, digits, `_`, `@`, `.` and `-`; starting
/// with a letter or a digit. Uniqueness within the instance is the store's check.
pub fn username(value: &str) -> Result<(), ValidationError> {
    credential_text("username", value, MIN_USERNAME_LEN, MAX_USERNAME_LEN, quoted(value))
}

/// Checks a password: 8 to 32 characters; letters, digits, `_`, `@`, `.` and `-`; starting
/// with a letter or a digit. The error describes the value without showing it.
pub fn password(value: &str) -> Result<(), ValidationError> {
    let hidden = format!("(hidden, {} characters)", value.chars().count());
    credential_text("password", value, MIN_PASSWORD_LEN, MAX_PASSWORD_LEN, hidden)
}

/// Checks the rule that usernames and passwords share.
fn credential_text(
    field: &'static str,
    value: &str,
    min: usize,
    max: usize,
    shown: String,
) -> Result<(), ValidationError> {
    let length = value.chars().count();
    if !(min..=max).contains(&length) {
        return Err(invalid(
            field,
            format!("must be {min} to {max} characters, not {length}"),
            shown,
        ));
    }
    if let Some(position) = value
        .chars()
        .position(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '@' | '.' | '-')))
    {
        return Err(invalid(
            field,
            format!(
                "may contain only letters, digits, '_', '@', '.' and '-'; character {} is not one",
                position + 1
            ),
            shown,
        ));
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(invalid(field, "must start with a letter or a digit", shown));
    }
    Ok(())
}

/// Checks an email address: 2 to 64 characters; letters, digits, `_`, `.`, `-` and `@`; and it
/// must contain `@`.
pub fn email(value: &str) -> Result<(), ValidationError> {
    let length = value.chars().count();
    if !(MIN_EMAIL_LEN..=MAX_EMAIL_LEN).contains(&length) {
        return Err(invalid(
            "email",
            format!("must be {MIN_EMAIL_LEN} to {MAX_EMAIL_LEN} characters, not {length}"),
            quoted(value),
        ));
    }
    if let Some(bad) =
        value.chars().find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '@')))
    {
        return Err(invalid(
            "email",
            format!("may contain only letters, digits, '_', '.', '-' and '@', not {bad:?}"),
            quoted(value),
        ));
    }
    if !value.contains('@') {
        return Err(invalid("email", "must contain '@'", quoted(value)));
    }
    Ok(())
}

/// Returns the username for an account created from its email address alone: the address
/// itself, if it can be a username.
///
/// # Errors
/// Says why the address cannot be a username (too long, too short, or its first character).
pub fn username_from_email(email_address: &str) -> Result<String, ValidationError> {
    email(email_address)?;
    username(email_address).map_err(|error| ValidationError {
        field: "email",
        rule: format!("cannot serve as the username ({}); give a username as well", error.rule),
        value: error.value,
    })?;
    Ok(email_address.to_owned())
}

/// Checks an account bandwidth in kbit/s against 1 and the box's per-account ceiling, which is
/// 2,000 kbit/s unless the admin configured a higher one (up to 10 Gbit/s).
pub fn bandwidth_kbps(value: u32, ceiling_kbps: u32) -> Result<(), ValidationError> {
    let ceiling = ceiling_kbps.min(MAX_BOX_BANDWIDTH_KBPS);
    if !(MIN_BANDWIDTH_KBPS..=ceiling).contains(&value) {
        return Err(invalid(
            "bandwidth",
            format!("must be {MIN_BANDWIDTH_KBPS} to {ceiling} kbit/s"),
            format!("{value} kbit/s"),
        ));
    }
    Ok(())
}

/// Checks a DNS server address pushed to clients: a unicast address, not unspecified,
/// broadcast, multicast or loopback (a client's own loopback is not this server).
pub fn dns_server(field: &'static str, address: Ipv4Addr) -> Result<(), ValidationError> {
    if address.is_unspecified()
        || address.is_broadcast()
        || address.is_multicast()
        || address.is_loopback()
    {
        return Err(invalid(
            field,
            "must be a unicast address, not unspecified, broadcast, multicast or loopback",
            address,
        ));
    }
    Ok(())
}

/// Returns whether two blocks share an address.
pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Checks an instance's client blocks: 1 to 5 private blocks, written with their network
/// address, of at most /30, overlapping neither each other nor `others` (the blocks of the
/// other instances on this box, each with its instance ID).
pub fn cidr_blocks(
    blocks: &[Ipv4Net],
    others: &[(String, Ipv4Net)],
) -> Result<(), ValidationError> {
    let field = "cidr_blocks";
    let listed = blocks.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    if !(MIN_CIDR_BLOCKS..=MAX_CIDR_BLOCKS).contains(&blocks.len()) {
        return Err(invalid(
            field,
            format!("must be {MIN_CIDR_BLOCKS} to {MAX_CIDR_BLOCKS} blocks, not {}", blocks.len()),
            quoted(&listed),
        ));
    }
    for block in blocks {
        if block.network() != block.addr() {
            return Err(invalid(
                field,
                format!("{block} has host bits set; write it as {}", block.trunc()),
                quoted(&listed),
            ));
        }
        if block.prefix_len() > MAX_CIDR_PREFIX_LEN {
            return Err(invalid(
                field,
                format!("{block} is longer than /{MAX_CIDR_PREFIX_LEN} and has no usable host"),
                quoted(&listed),
            ));
        }
        let private = PRIVATE_RANGES.iter().any(|(network, prefix)| {
            Ipv4Net::new(*network, *prefix).is_ok_and(|range| range.contains(block))
        });
        if !private {
            return Err(invalid(
                field,
                format!("{block} is not inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"),
                quoted(&listed),
            ));
        }
    }
    for (index, block) in blocks.iter().enumerate() {
        if let Some(other) = blocks[index + 1..].iter().find(|other| overlaps(block, other)) {
            return Err(invalid(field, format!("{block} overlaps {other}"), quoted(&listed)));
        }
        if let Some((instance, other)) = others.iter().find(|(_, other)| overlaps(block, other)) {
            return Err(invalid(
                field,
                format!("{block} overlaps {other} of instance {instance} on this box"),
                quoted(&listed),
            ));
        }
    }
    Ok(())
}

/// Checks a static client address: a usable host address (not the network or broadcast
/// address) inside one of the instance's blocks, not `taken` by another account.
pub fn static_ip(
    address: Ipv4Addr,
    blocks: &[Ipv4Net],
    taken: impl Fn(Ipv4Addr) -> bool,
) -> Result<(), ValidationError> {
    let field = "static_ip";
    let Some(block) = blocks.iter().find(|block| block.contains(&address)) else {
        let listed = blocks.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        return Err(invalid(
            field,
            format!("must lie inside one of the instance's blocks ({listed})"),
            address,
        ));
    };
    if address == block.network() {
        return Err(invalid(field, format!("is the network address of {block}"), address));
    }
    if address == block.broadcast() {
        return Err(invalid(field, format!("is the broadcast address of {block}"), address));
    }
    if taken(address) {
        return Err(invalid(field, "is already used by another account", address));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns a string of `length` characters: `first`, then `fill`.
    fn text(first: char, fill: char, length: usize) -> String {
        std::iter::once(first).chain(std::iter::repeat(fill)).take(length).collect()
    }

    fn field_of<T>(result: Result<T, ValidationError>) -> Option<&'static str> {
        result.err().map(|error| error.field)
    }

    #[test]
    fn username_length_edges() {
        for (length, valid) in [(6, false), (7, true), (33, true), (34, false)] {
            let value = text('a', 'b', length);
            assert_eq!(username(&value).is_ok(), valid, "length {length}");
        }
    }

    #[test]
    fn username_charset_and_first_character() {
        let cases = [
            ("user_01@x.y-z", true),
            ("0user_name", true),
            ("_username", false),
            ("@username", false),
            (".username", false),
            ("-username", false),
            ("user name", false),
            ("user+name", false),
            ("usér_name", false),
        ];
        for (value, valid) in cases {
            assert_eq!(username(value).is_ok(), valid, "{value:?}");
        }
    }

    #[test]
    fn password_length_edges() {
        for (length, valid) in [(7, false), (8, true), (32, true), (33, false)] {
            let value = text('P', 'x', length);
            assert_eq!(password(&value).is_ok(), valid, "length {length}");
        }
    }

    #[test]
    fn password_error_hides_value() {
        let error = password("s3cret!!x").unwrap_err();
        assert_eq!(error.field, "password");
        assert!(!error.to_string().contains("s3cret"), "{error}");
        assert_eq!(
            error.to_string(),
            "invalid password (hidden, 9 characters): may contain only letters, digits, '_', \
             '@', '.' and '-'; character 7 is not one"
        );
        assert!(password("_secret12").is_err());
        assert!(password("9secret_@.-").is_ok());
    }

    #[test]
    fn email_length_edges() {
        for (length, valid) in [(1, false), (2, true), (64, true), (65, false)] {
            let value = if length == 1 { "@".to_owned() } else { text('a', 'b', length - 1) + "@" };
            assert_eq!(value.chars().count(), length);
            assert_eq!(email(&value).is_ok(), valid, "length {length}");
        }
    }

    #[test]
    fn email_charset_and_at_sign() {
        assert!(email("first.last-1_x@example.com").is_ok());
        assert_eq!(
            email("no-at-sign.example.com").unwrap_err().to_string(),
            "invalid email \"no-at-sign.example.com\": must contain '@'"
        );
        assert!(email("first+tag@example.com").is_err());
        assert!(email("first last@example.com").is_err());
    }

    #[test]
    fn username_from_email_rules() {
        assert_eq!(username_from_email("alice@example.com").unwrap(), "alice@example.com");
        let short = username_from_email("a@b.cn").unwrap_err();
        assert_eq!(short.field, "email");
        assert!(short.rule.contains("must be 7 to 33 characters, not 6"), "{short}");
        let long = username_from_email(&(text('a', 'b', 30) + "@example.com")).unwrap_err();
        assert!(long.rule.contains("not 42"), "{long}");
        let first = username_from_email("_alice@example.com").unwrap_err();
        assert!(first.rule.contains("must start with a letter or a digit"), "{first}");
    }

    #[test]
    fn network_name_length_edges() {
        for field in ["ccn_name", "cen_name"] {
            for (length, valid) in [(1, false), (2, true), (100, true), (101, false)] {
                let value = text('n', '-', length);
                assert_eq!(network_name(field, &value).is_ok(), valid, "{field} length {length}");
            }
            assert_eq!(field_of(network_name(field, "x")), Some(field));
        }
    }

    #[test]
    fn network_name_charset_and_first_character() {
        let cases = [
            ("office_net-1", true),
            ("企业网络", true),
            ("网络_1", true),
            ("1network", false),
            ("_network", false),
            ("-network", false),
            ("net work", false),
            ("net.work", false),
        ];
        for (value, valid) in cases {
            assert_eq!(network_name("ccn_name", value).is_ok(), valid, "{value:?}");
        }
        // Length counts characters, not bytes: 100 Chinese characters fit.
        let long = "网".repeat(100);
        assert!(network_name("ccn_name", &long).is_ok());
    }

    #[test]
    fn bandwidth_edges() {
        let ceiling = MAX_ACCOUNT_BANDWIDTH_KBPS;
        for (value, valid) in [(0, false), (1, true), (2_000, true), (2_001, false)] {
            assert_eq!(bandwidth_kbps(value, ceiling).is_ok(), valid, "{value} kbit/s");
        }
        assert_eq!(
            bandwidth_kbps(2_001, ceiling).unwrap_err().to_string(),
            "invalid bandwidth 2001 kbit/s: must be 1 to 2000 kbit/s"
        );
        // A box configured for more lets more through, up to 10 Gbit/s.
        assert!(bandwidth_kbps(100_000, 100_000).is_ok());
        assert!(bandwidth_kbps(MAX_BOX_BANDWIDTH_KBPS + 1, u32::MAX).is_err());
    }

    #[test]
    fn dns_server_addresses() {
        assert!(dns_server("dns_active", Ipv4Addr::new(100, 100, 2, 136)).is_ok());
        for bad in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::LOCALHOST,
        ] {
            let error = dns_server("dns_standby", bad).unwrap_err();
            assert_eq!(error.field, "dns_standby", "{bad}");
        }
    }

    #[test]
    fn quota_edges() {
        for (value, valid) in [(4, false), (5, true), (1_000, true), (1_001, false)] {
            assert_eq!(account_quota(value).is_ok(), valid, "quota {value}");
        }
    }

    fn nets(blocks: &[&str]) -> Vec<Ipv4Net> {
        blocks.iter().map(|block| block.parse().unwrap()).collect()
    }

    #[test]
    fn cidr_block_count_edges() {
        let five =
            nets(&["10.1.0.0/24", "10.2.0.0/24", "10.3.0.0/24", "10.4.0.0/24", "10.5.0.0/24"]);
        assert!(cidr_blocks(&five, &[]).is_ok());
        let mut six = five.clone();
        six.push("10.6.0.0/24".parse().unwrap());
        let error = cidr_blocks(&six, &[]).unwrap_err();
        assert_eq!(error.field, "cidr_blocks");
        assert!(error.rule.contains("must be 1 to 5 blocks, not 6"), "{error}");
        assert!(cidr_blocks(&[], &[]).is_err());
    }

    #[test]
    fn cidr_blocks_overlap_within_and_across() {
        let error = cidr_blocks(&nets(&["10.1.0.0/16", "10.1.2.0/24"]), &[]).unwrap_err();
        assert_eq!(error.rule, "10.1.0.0/16 overlaps 10.1.2.0/24");
        let others = vec![("sag-aaaaaaaaaaaaaaaa".to_owned(), "192.168.0.0/16".parse().unwrap())];
        let error = cidr_blocks(&nets(&["192.168.7.0/24"]), &others).unwrap_err();
        assert_eq!(
            error.rule,
            "192.168.7.0/24 overlaps 192.168.0.0/16 of instance sag-aaaaaaaaaaaaaaaa on this box"
        );
        assert!(cidr_blocks(&nets(&["192.169.0.0/24"]), &others).is_err(), "not private");
        assert!(cidr_blocks(&nets(&["172.16.0.0/12"]), &others).is_ok());
    }

    #[test]
    fn cidr_block_shape() {
        let error = cidr_blocks(&nets(&["10.1.0.5/24"]), &[]).unwrap_err();
        assert_eq!(error.rule, "10.1.0.5/24 has host bits set; write it as 10.1.0.0/24");
        assert!(cidr_blocks(&nets(&["10.1.0.0/30"]), &[]).is_ok());
        assert!(cidr_blocks(&nets(&["10.1.0.0/31"]), &[]).is_err());
        assert!(cidr_blocks(&nets(&["8.8.8.0/24"]), &[]).is_err());
    }

    #[test]
    fn static_ip_rules() {
        let blocks = nets(&["10.1.0.0/24", "10.2.0.0/30"]);
        let taken = |address: Ipv4Addr| address == Ipv4Addr::new(10, 1, 0, 9);
        assert!(static_ip(Ipv4Addr::new(10, 1, 0, 1), &blocks, taken).is_ok());
        assert!(static_ip(Ipv4Addr::new(10, 2, 0, 2), &blocks, taken).is_ok());
        let cases = [
            (
                Ipv4Addr::new(10, 3, 0, 1),
                "must lie inside one of the instance's blocks (10.1.0.0/24, 10.2.0.0/30)",
            ),
            (Ipv4Addr::new(10, 1, 0, 0), "is the network address of 10.1.0.0/24"),
            (Ipv4Addr::new(10, 1, 0, 255), "is the broadcast address of 10.1.0.0/24"),
            (Ipv4Addr::new(10, 2, 0, 3), "is the broadcast address of 10.2.0.0/30"),
            (Ipv4Addr::new(10, 1, 0, 9), "is already used by another account"),
        ];
        for (address, rule) in cases {
            let error = static_ip(address, &blocks, taken).unwrap_err();
            assert_eq!(error.field, "static_ip");
            assert_eq!(error.rule, rule, "{address}");
        }
    }

    #[test]
    fn instance_id_format() {
        assert!(instance_id("sag-0123456789abcdef").is_ok());
        for bad in [
            "sag-0123456789abcde",
            "sag-0123456789abcdeF",
            "sa-0123456789abcdefg",
            "sag-0123456789abcdef0",
        ] {
            assert!(instance_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn area_names_and_zones() {
        assert!(area("cn-hangzhou").is_ok());
        assert!(area("eu-central-1").is_ok());
        assert!(area("1-area").is_err());
        assert!(area("EU-central").is_err());
        assert_eq!(Zone::of_area("cn-hangzhou"), Zone::MainlandChina);
        assert_eq!(Zone::of_area("me-east-1"), Zone::Dubai);
        assert_eq!(Zone::of_area("eu-central-1"), Zone::International);
        assert_eq!(Zone::of_area("me-west-1"), Zone::International);
    }
}
