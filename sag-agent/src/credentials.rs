//! Passwords: generation under the account rules, and argon2id hashing and verification.

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use rand::{seq::SliceRandom, Rng};

use crate::validation;

/// Length of generated passwords, in characters: about 95 bits of entropy over the allowed
/// 66 characters.
pub const GENERATED_PASSWORD_LEN: usize = 16;

const LOWERCASE: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const UPPERCASE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const DIGITS: &[u8] = b"0123456789";
const SYMBOLS: &[u8] = b"_@.-";

/// Errors of hashing and verification.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("failed to hash the password: {0}")]
    Hash(argon2::password_hash::Error),
    #[error("stored password hash is not a valid PHC string: {0}")]
    StoredHash(argon2::password_hash::Error),
}

/// Generates a random password that obeys the account rules: 16 characters from letters,
/// digits, `_`, `@`, `.` and `-`, starting with a letter, with at least one lowercase letter,
/// uppercase letter, digit and symbol.
pub fn generate_password() -> String {
    let mut rng = rand::rngs::OsRng;
    let all: Vec<u8> = [LOWERCASE, UPPERCASE, DIGITS, SYMBOLS].concat();
    let mut rest: Vec<u8> = [LOWERCASE, UPPERCASE, DIGITS, SYMBOLS]
        .iter()
        .map(|class| class[rng.gen_range(0..class.len())])
        .collect();
    while rest.len() < GENERATED_PASSWORD_LEN - 1 {
        rest.push(all[rng.gen_range(0..all.len())]);
    }
    rest.shuffle(&mut rng);
    let letters = [LOWERCASE, UPPERCASE].concat();
    let first = letters[rng.gen_range(0..letters.len())];
    let password: String = std::iter::once(first).chain(rest).map(char::from).collect();
    debug_assert!(validation::password(&password).is_ok());
    password
}

/// Returns the argon2id hash of `password` with a random salt, as a PHC string.
///
/// # Errors
/// Fails only if the hasher rejects its parameters.
pub fn hash_password(password: &str) -> Result<String, CredentialError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(CredentialError::Hash)
}

/// Returns whether `password` matches the stored PHC hash.
///
/// # Errors
/// Fails if the stored hash cannot be parsed.
pub fn verify_password(password: &str, stored_hash: &str) -> Result<bool, CredentialError> {
    let parsed = PasswordHash::new(stored_hash).map_err(CredentialError::StoredHash)?;
    Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_obey_rules() {
        for _ in 0..500 {
            let password = generate_password();
            assert_eq!(password.len(), GENERATED_PASSWORD_LEN);
            assert!(validation::password(&password).is_ok(), "{password}");
            assert!(password.starts_with(|c: char| c.is_ascii_alphabetic()), "{password}");
            assert!(password.bytes().any(|b| LOWERCASE.contains(&b)), "{password}");
            assert!(password.bytes().any(|b| UPPERCASE.contains(&b)), "{password}");
            assert!(password.bytes().any(|b| DIGITS.contains(&b)), "{password}");
            assert!(password.bytes().any(|b| SYMBOLS.contains(&b)), "{password}");
        }
    }

    #[test]
    fn generated_passwords_differ() {
        let first = generate_password();
        let second = generate_password();
        assert_ne!(first, second);
    }

    #[test]
    fn hash_is_argon2id_and_verifies() {
        let hash = hash_password("Correct.horse-1").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains("Correct.horse-1"));
        assert!(verify_password("Correct.horse-1", &hash).unwrap());
        assert!(!verify_password("Correct.horse-2", &hash).unwrap());
    }

    #[test]
    fn same_password_hashes_differently() {
        assert_ne!(hash_password("Same-pass1").unwrap(), hash_password("Same-pass1").unwrap());
    }

    #[test]
    fn malformed_stored_hash_is_an_error() {
        assert!(verify_password("anything1", "not-a-hash").is_err());
    }
}
