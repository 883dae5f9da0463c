//! A full-listing pass: the whole listing read, resumed where a pass left it, and
//! confirmed by a second listing before anything it missed is deleted.

use uuid::Uuid;

use super::{Finished, MAX_PAGES, PassError, Reader, Writer, too_many_pages};
use crate::model::{Checkpoint, DeletionPolicy, ListingProgress, SyncState};
use crate::sources::{ListingSource, Page, SourceError};
use crate::store::Store;

/// How many times one pass starts a listing again after it changed under its page numbers.
const MAX_LISTING_RESTARTS: u32 = 3;

/// Reads the whole listing, resuming the listing a pass left half way, or confirming
/// the one that awaits confirmation (both in `state`). `allow_mass_delete` is a
/// person's confirmation that it may delete more than the mass-deletion guard allows.
pub(super) async fn read<S: ListingSource, St: Store>(
    reader: &Reader<'_, S>,
    writer: &mut Writer<'_, St>,
    state: SyncState,
    allow_mass_delete: bool,
) -> Result<Finished, PassError> {
    let listing_mode = reader.source.listing();
    let scope_noun = listing_mode.scope_noun;
    let deletions = DeletionPolicy {
        max_delete_fraction: (!allow_mass_delete).then_some(listing_mode.max_delete_fraction),
        scopes: listing_mode.scopes,
    };
    let (saved, pending_confirmation) = (state.listing, state.pending_confirmation);
    let new_listing = |confirms: Option<Uuid>| ListingProgress {
        listing_id: Uuid::new_v4(),
        cursor: None,
        confirms,
    };
    let mut listing = match saved {
        Some(saved) => {
            tracing::info!(
                cursor = saved.cursor.as_deref().unwrap_or(""),
                "resuming the interrupted listing"
            );
            saved
        }
        None => new_listing(pending_confirmation),
    };
    let mut restarts = 0;
    let mut page_number = 0;
    // The page fetched while the last one was stored, if any.
    let mut prefetched = None;
    loop {
        page_number += 1;
        let at = || format!("page {page_number} of the listing");
        let fetched = match prefetched.take() {
            Some(fetched) => fetched,
            None => {
                let fetching = reader.source.fetch_listing_page(listing.cursor.as_deref());
                reader.fetch(fetching).await
            }
        };
        let Some(fetched) = fetched else {
            return Ok(Finished::Cancelled);
        };
        let mut page = match fetched {
            Ok(page) => page,
            Err(SourceError::ListingChanged(reason)) => {
                // Pages may have shifted: what this listing saw proves nothing.
                let abandoned = Checkpoint::ListingAbandoned {
                    listing_id: listing.listing_id,
                };
                writer.commit(Page::default(), &abandoned, at).await?;
                if restarts == MAX_LISTING_RESTARTS {
                    return Err(PassError::Fetch {
                        at: at(),
                        source: SourceError::ListingChanged(format!(
                            "{reason} (started again {MAX_LISTING_RESTARTS} times; nothing deleted)"
                        )),
                    });
                }
                tracing::warn!(reason = %crate::printable(&reason), "the listing changed while it was read; starting it again");
                restarts += 1;
                page_number = 0;
                listing = new_listing(listing.confirms);
                continue;
            }
            Err(source) => return Err(PassError::Fetch { at: at(), source }),
        };
        let next_cursor = page.next_cursor.take();
        if next_cursor.is_some() && page_number >= MAX_PAGES {
            return Err(too_many_pages(at(), page.request_id.take()));
        }
        let checkpoint = match &next_cursor {
            Some(cursor) => Checkpoint::Listing(ListingProgress {
                listing_id: listing.listing_id,
                cursor: Some(cursor.clone()),
                confirms: listing.confirms,
            }),
            None => Checkpoint::ListingDone {
                listing_id: listing.listing_id,
                confirms: listing.confirms,
                deletions: deletions.clone(),
            },
        };
        // The next page is fetched while this one is stored.
        let (counts, next) = tokio::try_join!(writer.commit(page, &checkpoint, at), async {
            Ok(match next_cursor.as_deref() {
                Some(cursor) => Some(
                    reader
                        .fetch(reader.source.fetch_listing_page(Some(cursor)))
                        .await,
                ),
                None => None,
            })
        })?;
        prefetched = next;
        if counts.awaiting_confirmation > 0 {
            // Page numbers may have shifted under the listing: a department it missed
            // is deleted only if a second complete listing misses it too.
            tracing::info!(
                missing = counts.awaiting_confirmation,
                "departments missing from the listing; reading it once more to confirm"
            );
            listing = new_listing(Some(listing.listing_id));
            page_number = 0;
            continue;
        }
        if let (false, Some(max_delete_fraction)) = (
            counts.withheld_deletions.is_empty(),
            deletions.max_delete_fraction,
        ) {
            return Err(PassError::MassDeletion {
                withheld: counts.withheld_deletions,
                scope_noun,
                max_delete_fraction,
            });
        }
        match next_cursor {
            Some(cursor) => listing.cursor = Some(cursor),
            None => return Ok(Finished::Completed),
        }
    }
}
