//! Where a page-numbered listing ends, by what the server says it served.
//!
//! A server may serve fewer records a page than asked for (a cap, often 100) and says so
//! in its metadata: its page size, its page count, a link to the next page, the number of
//! records it sent. Those, never the page size deptsync asked for, say whether another
//! page follows. Metadata that disagrees with itself (a page count the records do not
//! fill, a next page promised after the last record) cannot be trusted to say where the
//! listing ends: the page is refused, so that the pass fails and deletes nothing.

/// What one page of a page-numbered listing says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageMeta {
    /// The page's number, from 1.
    pub page: u64,
    /// How many records the page holds.
    pub served: u64,
    /// How many records the whole listing holds, as the page says.
    pub total: u64,
    /// The page size the server used, when it says.
    pub per_page: Option<u64>,
    /// How many pages the listing has, when it says.
    pub pages: Option<u64>,
    /// Whether it links a next page, when it says (a DRF `next`).
    pub has_next: Option<bool>,
}

impl PageMeta {
    /// Whether another page follows this one, or why the metadata cannot say.
    pub(crate) fn next_page_follows(&self) -> Result<bool, String> {
        let PageMeta {
            page,
            served,
            total,
            per_page,
            pages,
            has_next,
        } = *self;
        let disagree = |what: String| {
            Err(format!(
                "the listing's metadata disagrees with itself: {what}"
            ))
        };
        if page == 0 {
            return disagree("a page 0".to_owned());
        }
        if served > total {
            return disagree(format!(
                "{served} records on a page of a listing of {total}"
            ));
        }
        if let Some(per_page) = per_page {
            if per_page == 0 {
                return disagree("a page size of 0".to_owned());
            }
            if served > per_page {
                return disagree(format!("{served} records on a page of {per_page}"));
            }
            if let Some(pages) = pages {
                let filled = total.div_ceil(per_page);
                // An empty listing is one empty page, or none.
                if pages != filled && !(total == 0 && pages <= 1) {
                    return disagree(format!(
                        "{pages} pages for {total} records of {per_page} a page"
                    ));
                }
            }
        }
        let by_pages = pages.map(|pages| page < pages);
        let more = match (has_next, by_pages) {
            (Some(next), Some(by_pages)) if next != by_pages => {
                return disagree(format!(
                    "page {page} of {} {} a next page",
                    pages.unwrap_or_default(),
                    if next { "links" } else { "does not link" }
                ));
            }
            (Some(next), _) => next,
            (None, Some(by_pages)) => by_pages,
            (None, None) => return disagree("neither a page count nor a next page".to_owned()),
        };
        // The records before this page and on it, when the page size says.
        let read = per_page.map(|per_page| (page - 1).saturating_mul(per_page) + served);
        if more {
            if served == 0 {
                return disagree(format!("page {page} is empty but not the last"));
            }
            if let Some(per_page) = per_page
                && served < per_page
            {
                return disagree(format!(
                    "page {page} holds {served} of {per_page} records but is not the last"
                ));
            }
            let read = read.unwrap_or(page.saturating_mul(served));
            if read >= total {
                return disagree(format!(
                    "a page after page {page} promised, but its {read} records are all {total}"
                ));
            }
        } else {
            // Without the page size, only a first page that is also the last can be
            // checked: it must hold every record.
            let read = read.or((page == 1).then_some(served));
            if let Some(read) = read
                && read != total
            {
                return disagree(format!(
                    "the last page {page} ends at record {read} of {total}"
                ));
            }
        }
        Ok(more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(page: u64, served: u64, total: u64) -> PageMeta {
        PageMeta {
            page,
            served,
            total,
            per_page: Some(100),
            pages: Some(total.div_ceil(100).max(1)),
            has_next: None,
        }
    }

    #[test]
    fn a_capped_page_size_is_followed_to_the_last_page() {
        assert_eq!(meta(1, 100, 250).next_page_follows(), Ok(true));
        assert_eq!(meta(2, 100, 250).next_page_follows(), Ok(true));
        assert_eq!(meta(3, 50, 250).next_page_follows(), Ok(false));
        assert_eq!(meta(1, 0, 0).next_page_follows(), Ok(false));
        assert_eq!(meta(1, 100, 100).next_page_follows(), Ok(false));
    }

    #[test]
    fn a_next_link_is_followed_and_must_agree_with_the_page_count() {
        let linked = |page, served, next| PageMeta {
            has_next: Some(next),
            ..meta(page, served, 250)
        };
        assert_eq!(linked(1, 100, true).next_page_follows(), Ok(true));
        assert_eq!(linked(3, 50, false).next_page_follows(), Ok(false));
        assert!(linked(3, 50, true).next_page_follows().is_err());
        assert!(linked(1, 100, false).next_page_follows().is_err());
        let only_next = PageMeta {
            per_page: None,
            pages: None,
            ..linked(1, 100, true)
        };
        assert_eq!(only_next.next_page_follows(), Ok(true));
    }

    #[test]
    fn metadata_that_disagrees_with_itself_is_refused() {
        let wrong = |change: fn(&mut PageMeta)| {
            let mut page = meta(1, 100, 250);
            change(&mut page);
            page.next_page_follows().unwrap_err()
        };
        assert!(wrong(|m| m.pages = Some(1)).contains("disagrees"));
        assert!(wrong(|m| m.pages = Some(1_000_000)).contains("disagrees"));
        assert!(wrong(|m| m.served = 101).contains("disagrees"));
        assert!(wrong(|m| m.served = 60).contains("not the last"));
        assert!(wrong(|m| m.per_page = Some(0)).contains("disagrees"));
        // A next page promised when every record was served.
        let endless = PageMeta {
            page: 3,
            served: 100,
            total: 300,
            per_page: None,
            pages: None,
            has_next: Some(true),
        };
        assert!(endless.next_page_follows().is_err());
        // The last page must end at the last record.
        assert!(meta(3, 40, 250).next_page_follows().is_err());
        // A single page that says it is the last holds every record, whatever it says of
        // its page size.
        let alone = PageMeta {
            per_page: None,
            pages: None,
            has_next: Some(false),
            ..meta(1, 100, 450)
        };
        assert!(alone.next_page_follows().is_err());
        assert!(wrong(|m| m.page = 0).contains("page 0"));
    }
}
