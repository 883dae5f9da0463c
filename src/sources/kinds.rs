//! The registry of source kinds: every vendor deptsync knows, one line each (at the
//! bottom), and what that line makes: the kind's settings in [`KindSettings`], its
//! connector in [`Connector`], and the dispatch from either to the vendor's module.
//!
//! A vendor's module implements [`SourceKind`] (its config, validated into its
//! settings, and its connector built from them) and one of [`WindowedSource`] or
//! [`ListingSource`]; the line names it in the list of its reading.

use serde::de::DeserializeOwned;

use super::http::{RateLimit, SourceClient};
use super::settings::SourceSettings;
use super::{
    FullListingMode, ListingSource, Page, Source, SourceError, WindowedMode, WindowedSource,
};
use crate::config::{ConfigError, FieldContext, Table};
use crate::model::Window;

/// What a vendor's module tells the registry.
pub trait SourceKind: Sized {
    /// The `kind` value of the config file.
    const KIND: &'static str;
    /// The vendor's published request limit, the default of `rate_limit`.
    const DEFAULT_RATE_LIMIT: Option<RateLimit> = None;
    /// The kind's fields as written in the config file (besides those every kind takes),
    /// with `deny_unknown_fields`.
    type Config: DeserializeOwned;
    /// The kind's validated fields. `Debug` never shows a secret.
    type Settings: std::fmt::Debug + Clone;

    /// Validates the kind's fields. Does no I/O.
    fn validate(
        config: Self::Config,
        fields: &FieldContext<'_>,
    ) -> Result<Self::Settings, ConfigError>;

    /// The credential whose rate budget the source's requests spend (sources sharing it
    /// share the budget).
    fn credential(settings: &Self::Settings) -> &str;

    /// The connector, its requests sent through `client`. Does no I/O.
    fn connect(settings: Self::Settings, client: SourceClient) -> Self;
}

/// Reads and validates a `K` from the rest of a source's table.
fn validate<K: SourceKind>(
    table: Table,
    fields: &FieldContext<'_>,
    shared: &str,
) -> Result<K::Settings, ConfigError> {
    K::validate(fields.deserialize::<K::Config>(table, shared)?, fields)
}

/// A connector, as the engine reads it.
pub enum Connector {
    /// Its API filters by update time.
    Windowed(WindowedConnector),
    /// Its API can only list everything.
    Listing(ListingConnector),
}

impl Source for Connector {
    async fn check(&self) -> Result<(), SourceError> {
        match self {
            Connector::Windowed(source) => source.check().await,
            Connector::Listing(source) => source.check().await,
        }
    }

    fn scope(&self) -> String {
        match self {
            Connector::Windowed(source) => source.scope(),
            Connector::Listing(source) => source.scope(),
        }
    }
}

/// Defines [`KindSettings`], [`WindowedConnector`] and [`ListingConnector`] from the
/// lists of kinds, and the dispatch to each kind's module.
macro_rules! kinds {
    (
        windowed: [$($windowed:ident($windowed_type:ty)),* $(,)?],
        listing: [$($listing:ident($listing_type:ty)),* $(,)?] $(,)?
    ) => {
        /// A validated source's kind and the kind's own settings.
        #[derive(Debug)]
        pub enum KindSettings {
            $($windowed(<$windowed_type as SourceKind>::Settings),)*
            $($listing(<$listing_type as SourceKind>::Settings),)*
        }

        impl KindSettings {
            /// The `kind` values, as the config file spells them.
            pub const NAMES: &'static [&'static str] = &[
                $(<$windowed_type as SourceKind>::KIND,)*
                $(<$listing_type as SourceKind>::KIND,)*
            ];

            /// Validates the fields of a source of kind `kind`; `shared` names the fields
            /// every kind takes, for the message of an unknown one.
            pub(super) fn parse(
                kind: &str,
                table: Table,
                fields: &FieldContext<'_>,
                shared: &str,
            ) -> Result<KindSettings, ConfigError> {
                $(if kind == <$windowed_type as SourceKind>::KIND {
                    return Ok(KindSettings::$windowed(validate::<$windowed_type>(table, fields, shared)?));
                })*
                $(if kind == <$listing_type as SourceKind>::KIND {
                    return Ok(KindSettings::$listing(validate::<$listing_type>(table, fields, shared)?));
                })*
                Err(fields.error(
                    "kind",
                    format!(
                        "unknown kind {kind:?}; expected one of: {}",
                        KindSettings::NAMES.join(", ")
                    ),
                ))
            }

            /// The vendor's published request limit, when it has one.
            pub(super) fn default_rate_limit(&self) -> Option<RateLimit> {
                match self {
                    $(KindSettings::$windowed(_) => <$windowed_type as SourceKind>::DEFAULT_RATE_LIMIT,)*
                    $(KindSettings::$listing(_) => <$listing_type as SourceKind>::DEFAULT_RATE_LIMIT,)*
                }
            }
        }

        impl Connector {
            /// Builds the connector for a validated source, with an HTTP client of its own
            /// (its timeouts) whose requests spend its credential's rate budget. Does no
            /// I/O.
            pub fn new(settings: &SourceSettings) -> Result<Connector, reqwest::Error> {
                let client = |credential: &str| {
                    SourceClient::new(&settings.http, settings.name.as_str(), credential)
                };
                Ok(match &settings.kind {
                    $(KindSettings::$windowed(kind) => Connector::Windowed(WindowedConnector::$windowed(
                        <$windowed_type>::connect(kind.clone(), client(<$windowed_type>::credential(kind))?),
                    )),)*
                    $(KindSettings::$listing(kind) => Connector::Listing(ListingConnector::$listing(
                        <$listing_type>::connect(kind.clone(), client(<$listing_type>::credential(kind))?),
                    )),)*
                })
            }
        }

        /// A connector to an API that filters by update time.
        pub enum WindowedConnector {
            $($windowed($windowed_type),)*
        }

        impl Source for WindowedConnector {
            async fn check(&self) -> Result<(), SourceError> {
                match self {
                    $(WindowedConnector::$windowed(source) => source.check().await,)*
                }
            }

            fn scope(&self) -> String {
                match self {
                    $(WindowedConnector::$windowed(source) => source.scope(),)*
                }
            }
        }

        impl WindowedSource for WindowedConnector {
            fn windowing(&self) -> WindowedMode {
                match self {
                    $(WindowedConnector::$windowed(source) => source.windowing(),)*
                }
            }

            async fn fetch_window_page(
                &self,
                window: &Window,
                cursor: Option<&str>,
                page_size: u32,
            ) -> Result<Page, SourceError> {
                match self {
                    $(WindowedConnector::$windowed(source) => {
                        source.fetch_window_page(window, cursor, page_size).await
                    })*
                }
            }
        }

        /// A connector to an API that can only list everything.
        pub enum ListingConnector {
            $($listing($listing_type),)*
        }

        impl Source for ListingConnector {
            async fn check(&self) -> Result<(), SourceError> {
                match self {
                    $(ListingConnector::$listing(source) => source.check().await,)*
                }
            }

            fn scope(&self) -> String {
                match self {
                    $(ListingConnector::$listing(source) => source.scope(),)*
                }
            }
        }

        impl ListingSource for ListingConnector {
            fn listing(&self) -> FullListingMode {
                match self {
                    $(ListingConnector::$listing(source) => source.listing(),)*
                }
            }

            async fn fetch_listing_page(&self, cursor: Option<&str>) -> Result<Page, SourceError> {
                match self {
                    $(ListingConnector::$listing(source) => source.fetch_listing_page(cursor).await,)*
                }
            }
        }
    };
}

// The registry: a new kind is one line here.
kinds! {
    windowed: [
        Mews(super::mews::Mews),
    ],
    listing: [
        Procurify(super::procurify::Procurify),
        Snapbooks(super::snapbooks::Snapbooks),
        DataV1(super::data_v1::DataV1),
    ],
}
