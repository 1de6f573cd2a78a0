//! MMDS version 2's session tokens.
//!
//! A guest asks for one with `PUT /latest/api/token` and an `X-metadata-token-ttl-seconds`
//! header (1 to 21600 s, as Firecracker and EC2), then sends it in `X-metadata-token` with every
//! `GET`. A token is 32 random bytes from getrandom(2), written as hex; the authority keeps at
//! most [`MAX_TOKENS`] of them with their expiry, so a guest asking for tokens in a loop cannot
//! grow the VMM's memory: past the limit, the token closest to expiring is forgotten.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The shortest token lifetime, in seconds.
pub const MIN_TTL_SECONDS: u32 = 1;
/// The longest token lifetime, in seconds (six hours).
pub const MAX_TTL_SECONDS: u32 = 21600;
/// The most tokens alive at once.
pub const MAX_TOKENS: usize = 1024;

/// Why no token was issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// A lifetime outside 1 ..= 21600 s (Firecracker's text).
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between \
         {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}."
    )]
    InvalidTtl(u32),
    /// The host's random source failed.
    #[error("Failed to generate a session token: {0}")]
    Entropy(String),
}

/// The tokens issued and when each expires.
#[derive(Debug, Default)]
pub struct TokenAuthority {
    tokens: HashMap<String, Instant>,
}

impl TokenAuthority {
    /// Issues a token valid for `ttl_seconds` from `now`.
    pub fn issue(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, TokenError> {
        if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(TokenError::InvalidTtl(ttl_seconds));
        }
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| TokenError::Entropy(e.to_string()))?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.tokens.retain(|_, expiry| *expiry > now);
        if self.tokens.len() >= MAX_TOKENS {
            if let Some(oldest) = self
                .tokens
                .iter()
                .min_by_key(|(_, expiry)| **expiry)
                .map(|(token, _)| token.clone())
            {
                self.tokens.remove(&oldest);
            }
        }
        let expiry = now + Duration::from_secs(u64::from(ttl_seconds));
        self.tokens.insert(token.clone(), expiry);
        Ok(token)
    }

    /// Whether `token` was issued here and is still valid at `now`.
    pub fn is_valid(&self, token: &str, now: Instant) -> bool {
        self.tokens.get(token).is_some_and(|expiry| *expiry > now)
    }

    /// How many tokens are kept.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when no token is kept.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_and_are_bounded() {
        let mut authority = TokenAuthority::default();
        let now = Instant::now();
        assert_eq!(authority.issue(0, now), Err(TokenError::InvalidTtl(0)));
        assert_eq!(
            authority.issue(21601, now),
            Err(TokenError::InvalidTtl(21601))
        );
        let token = authority.issue(10, now).unwrap();
        assert_eq!(token.len(), 64);
        assert!(authority.is_valid(&token, now + Duration::from_secs(9)));
        assert!(!authority.is_valid(&token, now + Duration::from_secs(10)));
        assert!(!authority.is_valid("forged", now));
        assert_ne!(authority.issue(10, now).unwrap(), token);
        for i in 0..(MAX_TOKENS as u32 + 10) {
            authority.issue(100 + i, now).unwrap();
        }
        assert_eq!(authority.len(), MAX_TOKENS);
    }
}
