//! Identifiers of the domain. Each is a newtype that can only be built through
//! `parse`, so an empty or oversized name never gets past the edge.

use std::fmt;
use std::sync::Arc;

/// Longest identifier accepted (contract §3): keeps keys and index entries bounded.
pub const MAX_NAME_LEN: usize = 255;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    #[error("must not be empty")]
    Empty,
    #[error("is {0} characters long, more than the {MAX_NAME_LEN} allowed")]
    TooLong(usize),
    /// NUL cannot be stored in a PostgreSQL text column, nor meant by the ERP.
    #[error("contains a NUL character")]
    Nul,
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Shared, not copied: a product's lines and their copies all point
        /// at one string, so cloning an aggregate allocates little, and
        /// comparing two clones of a name is a pointer comparison.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Accepts a non-empty string of at most 255 characters.
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidName> {
                let value = value.into();
                let len = value.chars().count();
                if value.is_empty() {
                    Err(InvalidName::Empty)
                } else if len > MAX_NAME_LEN {
                    Err(InvalidName::TooLong(len))
                } else if value.contains('\0') {
                    Err(InvalidName::Nul)
                } else {
                    Ok(Self(Arc::from(value)))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A stock-keeping unit: the key of the `Product` aggregate.
    Sku
);
name_type!(
    /// A batch reference, unique across all products.
    BatchRef
);
name_type!(
    /// An order identifier; with a SKU it identifies an order line.
    OrderId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_blank_and_long_names() {
        assert_eq!(Sku::parse(""), Err(InvalidName::Empty));
        assert!(
            Sku::parse(" ").is_ok(),
            "contract §3 asks for non-empty, nothing more"
        );
        assert_eq!(Sku::parse("x".repeat(256)), Err(InvalidName::TooLong(256)));
        assert!(
            Sku::parse("é".repeat(255)).is_ok(),
            "the limit counts characters, not bytes"
        );
    }
}
