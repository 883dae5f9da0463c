//! The simulated world: the vendors' departments, generated the same on every run, the
//! fakes that serve them, and the changes the demo makes.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::fakes::data_v1::{self, FakeDataV1};
use crate::fakes::mews::{self, FakeDepartment, FakeMews};
use crate::fakes::procurify::{self, FakeProcurify};
use crate::fakes::snapbooks::{self, FakeSnapbooks};
use crate::report::table;

/// The demo's sources, as its config names them.
pub(super) const MEWS_SOURCE: &str = "demo-mews";
pub(super) const PROCURIFY_SOURCE: &str = "demo-procurify";
pub(super) const SNAPBOOKS_SOURCE: &str = "demo-snapbooks";
pub(super) const HR_SOURCE: &str = "demo-hr";
pub(super) const SOURCE_NAMES: [&str; 4] =
    [MEWS_SOURCE, PROCURIFY_SOURCE, SNAPBOOKS_SOURCE, HR_SOURCE];

/// Every demo shows the same departments: the generator is seeded.
pub(super) const SEED: u64 = 0x00de_9751_2026;
/// Where the simulated world's history ends (two days before it): a fixed instant, so
/// that every demo, and every `demo --serve`, holds the same departments, updated at the
/// same times.
pub(super) const DEMO_EPOCH_DAYS: i64 = 20_454; // 2026-01-01

pub(super) fn demo_epoch() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH + TimeDelta::days(DEMO_EPOCH_DAYS)
}

/// The Mews source's `start`: the earliest update the first pass reads.
pub(super) const MEWS_START: &str = "2021-01-01T00:00:00Z";
/// [`MEWS_START`] in days after the Unix epoch.
pub(super) const MEWS_START_DAYS: i64 = 18_628;
/// Mews' documented limit, enforced by the simulated Mews as the vendor does (deptsync's
/// own budget, 180 per 30 s, keeps under it).
pub(super) const MEWS_LIMIT: usize = 200;
pub(super) const MEWS_LIMIT_PERIOD: Duration = Duration::from_secs(30);

pub(super) const HOTELS: usize = 80;
/// Departments every hotel has.
pub(super) const HOTEL_CORE: [&str; 8] = [
    "Front Office",
    "Housekeeping",
    "Food & Beverage",
    "Maintenance",
    "Sales & Marketing",
    "Finance",
    "Human Resources",
    "Reservations",
];
/// Departments some hotels have.
pub(super) const HOTEL_OPTIONAL: [&str; 24] = [
    "Spa",
    "Concierge",
    "Restaurant",
    "Bar",
    "Room Service",
    "Banqueting",
    "Kitchen",
    "Laundry",
    "Security",
    "IT",
    "Revenue Management",
    "Guest Relations",
    "Fitness Centre",
    "Parking",
    "Events",
    "Purchasing",
    "Night Audit",
    "Minibar",
    "Business Centre",
    "Pool",
    "Kids Club",
    "Gift Shop",
    "Transport",
    "Engineering",
];

pub(super) const BRANCHES: i64 = 45;
/// Departments every Procurify branch has.
pub(super) const BRANCH_CORE: [&str; 3] = ["Operations", "Finance", "Sales"];
pub(super) const BRANCH_OPTIONAL: [&str; 18] = [
    "Engineering",
    "Marketing",
    "IT",
    "Legal",
    "Procurement",
    "Facilities",
    "Customer Success",
    "Human Resources",
    "Research & Development",
    "Quality Assurance",
    "Warehouse",
    "Executive",
    "Product",
    "Design",
    "Security",
    "Fleet",
    "Events",
    "Training",
];

/// The accountant's client accounts on Snapbooks.
pub(super) const CLIENT_ACCOUNTS: std::ops::RangeInclusive<i64> = 4501..=4530;
pub(super) const SNAPBOOKS_NAMES: [&str; 24] = [
    "Administrasjon",
    "Salg",
    "Lager",
    "Verksted",
    "Regnskap",
    "Butikk",
    "Kantine",
    "Prosjekt",
    "Service",
    "Marked",
    "Innkjøp",
    "Produksjon",
    "Logistikk",
    "IT",
    "HR",
    "Kundeservice",
    "Drift",
    "Utvikling",
    "Transport",
    "Bygg",
    "Renhold",
    "Vedlikehold",
    "Økonomi",
    "Ledelse",
];

/// The tenant's organization: divisions and their departments; teams per city below.
pub(super) const DIVISIONS: [(&str, [&str; 6]); 8] = [
    (
        "Operations",
        [
            "Logistics",
            "Facilities",
            "Procurement",
            "Quality",
            "Fleet",
            "Planning",
        ],
    ),
    (
        "Commercial",
        [
            "Sales",
            "Marketing",
            "Partnerships",
            "Pricing",
            "Key Accounts",
            "Brand",
        ],
    ),
    (
        "Finance",
        [
            "Accounting",
            "Treasury",
            "Controlling",
            "Tax",
            "Payroll",
            "Audit",
        ],
    ),
    (
        "People",
        [
            "Recruitment",
            "Learning",
            "Compensation",
            "Employee Relations",
            "Health & Safety",
            "Workplace",
        ],
    ),
    (
        "Technology",
        [
            "Platform",
            "Data",
            "Security",
            "IT Support",
            "Product",
            "Infrastructure",
        ],
    ),
    (
        "Legal & Compliance",
        [
            "Contracts",
            "Privacy",
            "Compliance",
            "Corporate Law",
            "Risk",
            "Ethics",
        ],
    ),
    (
        "Customer Care",
        [
            "Support",
            "Onboarding",
            "Success",
            "Complaints",
            "Field Service",
            "Quality Desk",
        ],
    ),
    (
        "Supply Chain",
        [
            "Sourcing",
            "Warehousing",
            "Distribution",
            "Inventory",
            "Imports",
            "Returns",
        ],
    ),
];
pub(super) const CITIES: [&str; 8] = [
    "Oslo",
    "Bergen",
    "Trondheim",
    "Stavanger",
    "Tromsø",
    "Kristiansand",
    "Bodø",
    "Ålesund",
];

/// A Procurify department as the demo keeps track of it.
#[derive(Debug, Clone)]
pub(super) struct ProcurifyDepartment {
    id: i64,
    name: String,
    branch: i64,
    active: bool,
}

/// A Snapbooks department; `is_active: None` leaves the field out (active).
#[derive(Debug, Clone)]
pub(super) struct SnapbooksDepartment {
    id: i64,
    name: String,
    account: i64,
    is_active: Option<bool>,
}

/// A department of the tenant's tree.
#[derive(Debug, Clone)]
pub(super) struct HrDepartment {
    id: String,
    parent: Option<String>,
    name: String,
}

/// What the simulated APIs hold.
pub(super) struct Upstream {
    pub(super) hotels: Vec<Uuid>,
    pub(super) mews: Vec<FakeDepartment>,
    pub(super) procurify: Vec<ProcurifyDepartment>,
    pub(super) snapbooks: Vec<SnapbooksDepartment>,
    pub(super) hr: Vec<HrDepartment>,
}

pub(super) fn uuid(rng: &mut fastrand::Rng) -> Uuid {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// An instant in `[from, to)`, in whole seconds (`from` when the range is empty).
pub(super) fn instant_between(
    rng: &mut fastrand::Rng,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> DateTime<Utc> {
    let span = (to - from).num_seconds().max(1);
    (from + TimeDelta::seconds(rng.i64(0..span))).trunc_subsecs(0)
}

/// `count` names of `pool`, in a random order.
pub(super) fn some_of<'a>(rng: &mut fastrand::Rng, pool: &[&'a str], count: usize) -> Vec<&'a str> {
    let mut names = pool.to_vec();
    rng.shuffle(&mut names);
    names.truncate(count);
    names
}

pub(super) fn mews_start() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH + TimeDelta::days(MEWS_START_DAYS)
}

impl Upstream {
    /// The departments of every simulated API, as of `now`: the same on every run but
    /// for the instants, which end two days before `now`.
    pub(super) fn generate(now: DateTime<Utc>) -> Upstream {
        let mut rng = fastrand::Rng::with_seed(SEED);
        let history_end = now - TimeDelta::days(2);

        let mut hotels = Vec::with_capacity(HOTELS);
        let mut mews = Vec::new();
        for _ in 0..HOTELS {
            let enterprise = uuid(&mut rng);
            hotels.push(enterprise);
            let joined = instant_between(&mut rng, mews_start(), now - TimeDelta::days(180));
            let extra = rng.usize(8..=16);
            let names = HOTEL_CORE
                .iter()
                .copied()
                .chain(some_of(&mut rng, &HOTEL_OPTIONAL, extra));
            for name in names.collect::<Vec<_>>() {
                let updated = instant_between(&mut rng, joined + TimeDelta::days(1), history_end);
                let created = instant_between(&mut rng, joined, updated);
                let mut department = FakeDepartment::new(uuid(&mut rng), enterprise, name, updated);
                department.json["CreatedUtc"] = json!(mews::format_utc(created));
                if rng.f64() < 0.03 {
                    department.json["IsActive"] = json!(false);
                }
                mews.push(department);
            }
        }

        let mut procurify = Vec::new();
        for branch in 1..=BRANCHES {
            let extra = rng.usize(6..=14);
            let names = BRANCH_CORE
                .iter()
                .copied()
                .chain(some_of(&mut rng, &BRANCH_OPTIONAL, extra))
                .collect::<Vec<_>>();
            for name in names {
                procurify.push(ProcurifyDepartment {
                    id: procurify.len() as i64 + 1,
                    name: name.to_owned(),
                    branch,
                    active: rng.f64() >= 0.04,
                });
            }
        }

        let mut snapbooks = Vec::new();
        for account in CLIENT_ACCOUNTS {
            let count = rng.usize(10..=22);
            for name in some_of(&mut rng, &SNAPBOOKS_NAMES, count) {
                let is_active = match rng.f64() {
                    p if p < 0.12 => Some(false),
                    p if p < 0.40 => None,
                    _ => Some(true),
                };
                snapbooks.push(SnapbooksDepartment {
                    id: 10_001 + snapbooks.len() as i64,
                    name: name.to_owned(),
                    account,
                    is_active,
                });
            }
        }

        let mut hr = vec![HrDepartment {
            id: "ORG".to_owned(),
            parent: None,
            name: "Nordlys Group".to_owned(),
        }];
        for (d, (division, departments)) in DIVISIONS.iter().enumerate() {
            let division_id = format!("DIV-{}", d + 1);
            hr.push(HrDepartment {
                id: division_id.clone(),
                parent: Some("ORG".to_owned()),
                name: (*division).to_owned(),
            });
            for (p, department) in departments.iter().enumerate() {
                let department_id = format!("DEP-{}-{}", d + 1, p + 1);
                hr.push(HrDepartment {
                    id: department_id.clone(),
                    parent: Some(division_id.clone()),
                    name: (*department).to_owned(),
                });
                let teams = rng.usize(3..=7);
                for (t, city) in some_of(&mut rng, &CITIES, teams).into_iter().enumerate() {
                    hr.push(HrDepartment {
                        id: format!("TEAM-{}-{}-{}", d + 1, p + 1, t + 1),
                        parent: Some(department_id.clone()),
                        name: format!("{department} {city}"),
                    });
                }
            }
        }

        Upstream {
            hotels,
            mews,
            procurify,
            snapbooks,
            hr,
        }
    }

    pub(super) fn department_count(&self) -> usize {
        self.mews.len() + self.procurify.len() + self.snapbooks.len() + self.hr.len()
    }

    pub(super) fn client_accounts(&self) -> Vec<i64> {
        let mut accounts: Vec<i64> = self.snapbooks.iter().map(|d| d.account).collect();
        accounts.sort_unstable();
        accounts.dedup();
        accounts
    }
}

/// The four simulated APIs, serving, and what they hold.
pub(super) struct Simulation {
    pub(super) mews: FakeMews,
    pub(super) procurify: FakeProcurify,
    pub(super) snapbooks: FakeSnapbooks,
    pub(super) hr: FakeDataV1,
    pub(super) upstream: Upstream,
}

/// A Mews department updated at `updated`, as a change upstream makes it.
pub(super) fn touch(department: &mut FakeDepartment, updated: DateTime<Utc>) {
    department.updated = updated;
    department.json["UpdatedUtc"] = json!(mews::format_utc(updated));
}

impl Simulation {
    /// Starts the four APIs on ephemeral loopback ports, holding `upstream`.
    pub(super) async fn start(upstream: Upstream) -> std::io::Result<Simulation> {
        let mews = FakeMews::start().await?;
        mews.enforce_rate_limit(MEWS_LIMIT, MEWS_LIMIT_PERIOD);
        for department in &upstream.mews {
            mews.insert(department.clone());
        }
        let procurify = FakeProcurify::start().await?;
        for d in &upstream.procurify {
            procurify.put(d.id, &d.name, d.branch, d.active);
        }
        let snapbooks = FakeSnapbooks::start(&upstream.client_accounts()).await?;
        for d in &upstream.snapbooks {
            snapbooks.put(d.id, &d.name, d.account, d.is_active);
        }
        let hr = FakeDataV1::start().await?;
        for d in &upstream.hr {
            hr.put(&d.id, d.parent.as_deref(), &d.name);
        }
        Ok(Simulation {
            mews,
            procurify,
            snapbooks,
            hr,
            upstream,
        })
    }

    /// Requests the simulated API behind source `name` has answered so far.
    pub(super) fn requests(&self, name: &str) -> usize {
        match name {
            MEWS_SOURCE => self.mews.shared.requests(),
            PROCURIFY_SOURCE => self.procurify.shared.requests(),
            SNAPBOOKS_SOURCE => self.snapbooks.shared.requests(),
            HR_SOURCE => self.hr.shared.requests(),
            _ => 0,
        }
    }

    /// Fails when deptsync broke a rule of a vendor's API: the simulated APIs record
    /// every breach (and refuse the request).
    pub(super) fn check_rules(&self) -> anyhow::Result<()> {
        let breaches: Vec<String> = [
            (MEWS_SOURCE, self.mews.shared.violations()),
            (PROCURIFY_SOURCE, self.procurify.shared.violations()),
            (SNAPBOOKS_SOURCE, self.snapbooks.shared.violations()),
            (HR_SOURCE, self.hr.shared.violations()),
        ]
        .into_iter()
        .flat_map(|(name, violations)| violations.into_iter().map(move |v| format!("{name}: {v}")))
        .collect();
        if breaches.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "deptsync broke the rules of a simulated API:\n  {}",
            breaches.join("\n  ")
        )
    }

    /// One line per API: what it is, where, and what it holds.
    pub(super) fn describe(&self) -> String {
        let upstream = &self.upstream;
        let inactive_mews = upstream
            .mews
            .iter()
            .filter(|d| d.json["IsActive"] == json!(false))
            .count();
        let oldest = upstream.mews.iter().map(|d| d.updated).min();
        let newest = upstream.mews.iter().map(|d| d.updated).max();
        let month = |t: Option<DateTime<Utc>>| {
            t.map_or_else(String::new, |t| t.format("%Y-%m").to_string())
        };
        let inactive_snapbooks = upstream
            .snapbooks
            .iter()
            .filter(|d| d.is_active == Some(false))
            .count();
        let inactive_procurify = upstream.procurify.iter().filter(|d| !d.active).count();
        let roots = upstream.hr.iter().filter(|d| d.parent.is_none()).count();
        let lines = [
            (
                MEWS_SOURCE,
                "Mews Connector API",
                &self.mews.base_url,
                format!(
                    "{} departments of {} hotels ({inactive_mews} inactive), updated {} to {}",
                    upstream.mews.len(),
                    upstream.hotels.len(),
                    month(oldest),
                    month(newest)
                ),
            ),
            (
                PROCURIFY_SOURCE,
                "Procurify API v3",
                &self.procurify.base_url,
                format!(
                    "{} departments of {BRANCHES} branches ({inactive_procurify} inactive)",
                    upstream.procurify.len()
                ),
            ),
            (
                SNAPBOOKS_SOURCE,
                "Snapbooks API v2",
                &self.snapbooks.base_url,
                format!(
                    "{} departments of {} client accounts ({inactive_snapbooks} inactive)",
                    upstream.snapbooks.len(),
                    upstream.client_accounts().len()
                ),
            ),
            (
                HR_SOURCE,
                "tenant data API",
                &self.hr.base_url,
                format!(
                    "{} departments in a tree ({roots} root, divisions, departments, teams)",
                    upstream.hr.len()
                ),
            ),
        ];
        let mut table = table();
        for (name, api, url, holds) in lines {
            table.add_row([name.to_owned(), api.to_owned(), url.clone(), holds]);
        }
        format!("{table}\n")
    }

    /// The config of the four sources, pointing at the simulated APIs, with the database
    /// at `database_url` and, when given, a `schedule` for `run`.
    pub(super) fn config_toml(&self, database_url: &str, schedule: Option<&str>) -> String {
        let schedule = schedule
            .map(|s| format!("schedule = {}\n", toml_string(s)))
            .unwrap_or_default();
        format!(
            r#"[database]
url = {database}

[[sources]]
name = "{MEWS_SOURCE}"
kind = "mews"
base_url = "{mews_url}"
client_token = "{mews_client}"
access_token = "{mews_access}"
start = "{MEWS_START}"
page_size = 100
{schedule}
[[sources]]
name = "{PROCURIFY_SOURCE}"
kind = "procurify"
base_url = "{procurify_url}"
client_id = "{procurify_id}"
client_secret = "{procurify_secret}"
page_size = 100
{schedule}
[[sources]]
name = "{SNAPBOOKS_SOURCE}"
kind = "snapbooks"
base_url = "{snapbooks_url}"
token = "{snapbooks_token}"
page_size = 100
{schedule}
[[sources]]
name = "{HR_SOURCE}"
kind = "data_v1"
base_url = "{hr_url}"
token = "{hr_token}"
{schedule}"#,
            database = toml_string(database_url),
            mews_url = self.mews.base_url,
            mews_client = mews::CLIENT_TOKEN,
            mews_access = mews::ACCESS_TOKEN,
            procurify_url = self.procurify.base_url,
            procurify_id = procurify::CLIENT_ID,
            procurify_secret = procurify::CLIENT_SECRET,
            snapbooks_url = self.snapbooks.base_url,
            snapbooks_token = snapbooks::TOKEN,
            hr_url = self.hr.base_url,
            hr_token = data_v1::TOKEN,
        )
    }

    /// Changes every API a little, as people do between two syncs; returns what changed,
    /// per source. Mews changes are updated at `now` (less a second, so that they sit
    /// inside the next pass's range however soon it starts).
    pub(super) fn change_upstream(&mut self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        let updated = now.trunc_subsecs(0) - TimeDelta::seconds(1);
        vec![
            (MEWS_SOURCE, self.change_mews(updated)),
            (PROCURIFY_SOURCE, self.change_procurify()),
            (SNAPBOOKS_SOURCE, self.change_snapbooks()),
            (HR_SOURCE, self.change_hr()),
        ]
    }

    pub(super) fn change_mews(&mut self, updated: DateTime<Utc>) -> String {
        let mut rng = fastrand::Rng::with_seed(SEED + 1);
        let mut changed = Vec::new();
        let spas = self.upstream.mews.iter().enumerate();
        let spas: Vec<usize> = spas
            .filter(|(_, d)| d.name() == "Spa")
            .map(|(i, _)| i)
            .take(3)
            .collect();
        for &i in &spas {
            let department = &mut self.upstream.mews[i];
            department.json["Name"] = json!("Spa & Wellness");
            touch(department, updated);
            changed.push(department.clone());
        }
        let laundries: Vec<usize> = (self.upstream.mews.iter().enumerate())
            .filter(|(_, d)| d.name() == "Laundry" && d.json["IsActive"] == json!(true))
            .map(|(i, _)| i)
            .take(2)
            .collect();
        for &i in &laundries {
            let department = &mut self.upstream.mews[i];
            department.json["IsActive"] = json!(false);
            touch(department, updated);
            changed.push(department.clone());
        }
        let hotel = uuid(&mut rng);
        self.upstream.hotels.push(hotel);
        let names: Vec<&str> = HOTEL_CORE
            .iter()
            .copied()
            .chain(some_of(&mut rng, &HOTEL_OPTIONAL, 10))
            .collect();
        for name in &names {
            let mut department = FakeDepartment::new(uuid(&mut rng), hotel, name, updated);
            department.json["CreatedUtc"] = json!(mews::format_utc(updated));
            changed.push(department);
        }
        let rooftop_hotels: Vec<Uuid> = self.upstream.hotels.iter().take(2).copied().collect();
        for &enterprise in &rooftop_hotels {
            let mut department =
                FakeDepartment::new(uuid(&mut rng), enterprise, "Rooftop Bar", updated);
            department.json["CreatedUtc"] = json!(mews::format_utc(updated));
            changed.push(department);
        }
        let new = names.len() + rooftop_hotels.len();
        for department in &changed[spas.len() + laundries.len()..] {
            self.upstream.mews.push(department.clone());
        }
        for department in changed {
            self.mews.insert(department);
        }
        format!(
            "{} renamed (Spa to Spa & Wellness), {} deactivated (Laundry, outsourced), a new hotel \
             with {} departments, a Rooftop Bar at {} hotels: {new} new, all updated now",
            spas.len(),
            laundries.len(),
            names.len(),
            rooftop_hotels.len()
        )
    }

    pub(super) fn change_procurify(&mut self) -> String {
        let departments = &mut self.upstream.procurify;
        let mut renamed = 0;
        for branch in [3, 4] {
            if let Some(d) = departments
                .iter_mut()
                .find(|d| d.name == "Sales" && d.branch == branch)
            {
                d.name = "Sales & Business Development".to_owned();
                self.procurify.put(d.id, &d.name, d.branch, d.active);
                renamed += 1;
            }
        }
        let mut deactivated = 0;
        for branch in [5, 6] {
            if let Some(d) = departments
                .iter_mut()
                .find(|d| d.name == "Finance" && d.branch == branch)
            {
                d.active = false;
                self.procurify.put(d.id, &d.name, d.branch, d.active);
                deactivated += 1;
            }
        }
        let mut removed = Vec::new();
        if let Some(at) = departments
            .iter()
            .position(|d| d.name == "Operations" && d.branch == 7)
        {
            let gone = departments.remove(at);
            self.procurify.remove(gone.id);
            removed.push(format!("{} of branch {}", gone.name, gone.branch));
        }
        let first_new_id = departments.iter().map(|d| d.id).max().unwrap_or(0) + 1;
        let new_branches = 1..=3;
        let added = new_branches.clone().count();
        for (id, branch) in (first_new_id..).zip(new_branches) {
            let new = ProcurifyDepartment {
                id,
                name: "Sustainability".to_owned(),
                branch,
                active: true,
            };
            self.procurify
                .put(new.id, &new.name, new.branch, new.active);
            departments.push(new);
        }
        format!(
            "{renamed} renamed (Sales to Sales & Business Development), {deactivated} deactivated \
             (Finance, centralised), {} removed ({}), {added} new (Sustainability)",
            removed.len(),
            removed.join(", ")
        )
    }

    pub(super) fn change_snapbooks(&mut self) -> String {
        let departments = &mut self.upstream.snapbooks;
        let active = |d: &SnapbooksDepartment| d.is_active != Some(false);
        let mut deactivated = 0;
        for d in departments
            .iter_mut()
            .filter(|d| d.name == "Kantine" && active(d))
            .take(3)
        {
            d.is_active = Some(false);
            self.snapbooks.put(d.id, &d.name, d.account, d.is_active);
            deactivated += 1;
        }
        let mut reactivated = 0;
        if let Some(d) = departments
            .iter_mut()
            .find(|d| d.name != "Kantine" && d.is_active == Some(false))
        {
            d.is_active = Some(true);
            self.snapbooks.put(d.id, &d.name, d.account, d.is_active);
            reactivated += 1;
        }
        let mut renamed = 0;
        if let Some(d) = departments.iter_mut().find(|d| d.name == "Lager") {
            d.name = "Lager og logistikk".to_owned();
            self.snapbooks.put(d.id, &d.name, d.account, d.is_active);
            renamed += 1;
        }
        let first_new_id = departments.iter().map(|d| d.id).max().unwrap_or(10_000) + 1;
        let new_accounts: Vec<i64> = CLIENT_ACCOUNTS.take(2).collect();
        let added = new_accounts.len();
        for (id, account) in (first_new_id..).zip(new_accounts) {
            let new = SnapbooksDepartment {
                id,
                name: "Netthandel".to_owned(),
                account,
                is_active: Some(true),
            };
            self.snapbooks
                .put(new.id, &new.name, new.account, new.is_active);
            departments.push(new);
        }
        format!(
            "{deactivated} deactivated (Kantine), {reactivated} reactivated, {renamed} renamed \
             (Lager to Lager og logistikk), {added} new (Netthandel, an online shop)"
        )
    }

    pub(super) fn change_hr(&mut self) -> String {
        let departments = &mut self.upstream.hr;
        let mut renamed = 0;
        if let Some(d) = departments.iter_mut().find(|d| d.name == "Customer Care") {
            d.name = "Customer Experience".to_owned();
            self.hr.put(&d.id, d.parent.as_deref(), &d.name);
            renamed += 1;
        }
        // A team moves to another department: a new parent_external_id.
        let onboarding = departments
            .iter()
            .find(|d| d.name == "Onboarding")
            .map(|d| d.id.clone());
        let support = departments
            .iter()
            .find(|d| d.name == "Support")
            .map(|d| d.id.clone());
        let mut moved = 0;
        if let (Some(onboarding), Some(support)) = (onboarding, support)
            && let Some(team) = departments
                .iter_mut()
                .find(|d| d.parent.as_deref() == Some(support.as_str()))
        {
            team.parent = Some(onboarding);
            self.hr.put(&team.id, team.parent.as_deref(), &team.name);
            moved += 1;
        }
        let mut removed = Vec::new();
        let imports = departments
            .iter()
            .find(|d| d.name == "Imports")
            .map(|d| d.id.clone());
        if let Some(at) = imports.and_then(|imports| {
            departments
                .iter()
                .rposition(|d| d.parent.as_deref() == Some(imports.as_str()))
        }) {
            let gone = departments.remove(at);
            self.hr.remove(&gone.id);
            removed.push(gone.name);
        }
        let mut added = 0;
        for department in ["Data", "Security"] {
            let Some(parent) = departments
                .iter()
                .find(|d| d.name == department)
                .map(|d| d.id.clone())
            else {
                continue;
            };
            let new = HrDepartment {
                id: format!("{parent}-NARVIK").replace("DEP-", "TEAM-"),
                parent: Some(parent),
                name: format!("{department} Narvik"),
            };
            self.hr.put(&new.id, new.parent.as_deref(), &new.name);
            departments.push(new);
            added += 1;
        }
        format!(
            "{renamed} renamed (Customer Care to Customer Experience), {moved} team moved to \
             another department, {} removed ({}), {added} new (teams in Narvik)",
            removed.len(),
            removed.join(", ")
        )
    }
}

/// `text` as a TOML basic string.
pub(super) fn toml_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(quoted, "\\u{:04X}", u32::from(c));
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::Settings;
    use crate::demo::DEMO_DATABASE_URL;

    #[test]
    fn the_mews_start_is_the_one_configured() {
        assert_eq!(mews::format_utc(mews_start()), MEWS_START);
    }

    #[test]
    fn the_upstream_is_a_few_thousand_departments_the_same_on_every_run() {
        let now = Utc::now();
        let upstream = Upstream::generate(now);
        let again = Upstream::generate(now);
        assert_eq!(upstream.department_count(), again.department_count());
        assert!(
            (2_000..5_000).contains(&upstream.department_count()),
            "{}",
            upstream.department_count()
        );
        assert!(upstream.mews.len() > 1_000);
        // Updated over several years, all before the first pass.
        let years: std::collections::BTreeSet<_> = upstream
            .mews
            .iter()
            .map(|d| d.updated.format("%Y").to_string())
            .collect();
        assert!(years.len() >= 5, "{years:?}");
        assert!(
            upstream
                .mews
                .iter()
                .all(|d| d.updated < now - TimeDelta::days(1))
        );
        assert!(
            upstream
                .snapbooks
                .iter()
                .any(|d| d.is_active == Some(false))
        );
        assert!(upstream.snapbooks.iter().any(|d| d.is_active.is_none()));
        // The tree hangs together: every parent is a department.
        let ids: std::collections::HashSet<&str> =
            upstream.hr.iter().map(|d| d.id.as_str()).collect();
        assert!(
            upstream
                .hr
                .iter()
                .filter_map(|d| d.parent.as_deref())
                .all(|parent| ids.contains(parent))
        );
    }

    #[test]
    fn ids_are_unique_per_source() {
        let upstream = Upstream::generate(Utc::now());
        let unique = |ids: Vec<String>| {
            let count = ids.len();
            let set: std::collections::HashSet<_> = ids.into_iter().collect();
            set.len() == count
        };
        assert!(unique(
            upstream.mews.iter().map(|d| d.id.to_string()).collect()
        ));
        assert!(unique(
            upstream
                .procurify
                .iter()
                .map(|d| d.id.to_string())
                .collect()
        ));
        assert!(unique(
            upstream
                .snapbooks
                .iter()
                .map(|d| d.id.to_string())
                .collect()
        ));
        assert!(unique(upstream.hr.iter().map(|d| d.id.clone()).collect()));
    }

    #[tokio::test]
    async fn the_config_points_at_the_simulated_apis_and_passes_validation() {
        let simulation = Simulation::start(Upstream::generate(Utc::now()))
            .await
            .unwrap();
        for schedule in [None, Some("0 * * * * *")] {
            let toml = simulation.config_toml("sqlite://some dir/demo \"x\".db", schedule);
            let settings = Settings::parse(&toml, &|_| None).unwrap();
            let names: Vec<&str> = settings.sources.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, SOURCE_NAMES);
            assert_eq!(
                settings.database.url.expose_secret(),
                "sqlite://some dir/demo \"x\".db"
            );
        }
        assert!(
            simulation
                .config_toml(DEMO_DATABASE_URL, None)
                .contains(&simulation.mews.base_url)
        );
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("sqlite://x.db"), "\"sqlite://x.db\"");
    }
}
