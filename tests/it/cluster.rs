//! A PostgreSQL cluster of one test's own, on a port of its own, for what must never be
//! done to the shared server: crashing it, restoring into it. Made with the distribution's
//! `pg_createcluster` (trust auth on loopback) and removed with everything in it when the
//! test ends.

use std::process::Command;

/// A throwaway cluster, started; dropped (stopped and removed) with the value.
pub struct Cluster {
    version: String,
    name: String,
    pub port: u16,
}

impl Cluster {
    /// A new cluster with `settings` (`name=value`) in its `postgresql.conf`, started.
    /// Panics with what to do where clusters cannot be made: a test that needs one must
    /// not pass without it.
    pub fn start(settings: &[&str]) -> Cluster {
        let version = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .filter_map(|v| v.ok()?.file_name().into_string().ok())
                    .filter_map(|v| v.parse::<u32>().ok())
                    .max()
            })
            .expect(
                "a throwaway cluster needs PostgreSQL's server packages (scripts/ensure-postgres)",
            )
            .to_string();
        let port = free_port();
        let name = format!(
            "deptsync_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut command = Command::new("pg_createcluster");
        command.args([&version, &name, "-p", &port.to_string(), "--start"]);
        for setting in settings {
            command.args(["-o", setting]);
        }
        command.args(["--", "--auth=trust"]);
        let output = command
            .output()
            .expect("pg_createcluster (postgresql-common) runs, as root");
        assert!(
            output.status.success(),
            "pg_createcluster failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Cluster {
            version,
            name,
            port,
        }
    }

    /// The URL of `database` on this cluster, as user `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs `pg_ctlcluster` with `action` and its `args`.
    fn control(&self, action: &str, args: &[&str]) {
        run(Command::new("pg_ctlcluster")
            .args([
                "--skip-systemctl-redirect",
                &self.version,
                &self.name,
                action,
            ])
            .args(args));
    }

    /// Kills the server as a power cut or the OOM killer would (`stop -m immediate`: no
    /// checkpoint, no flush), then starts it again; it recovers from its WAL.
    pub fn crash_and_restart(&self) {
        self.control("stop", &["-m", "immediate"]);
        self.control("start", &[]);
    }

    /// Runs `psql` on `database` of this cluster with `args`; its standard output.
    pub fn psql(&self, database: &str, args: &[&str]) -> String {
        run(Command::new("psql")
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-d",
                &self.url(database),
            ])
            .args(args))
    }

    /// Dumps `database` to `file` (`pg_dump`'s custom format).
    pub fn dump(&self, database: &str, file: &std::path::Path) {
        run(Command::new("pg_dump")
            .args(["-Fc", "-d", &self.url(database), "-f"])
            .arg(file));
    }

    /// Restores `file` (a dump) into `database`; with `clean`, over what it holds
    /// (`pg_restore --clean`).
    pub fn restore(&self, database: &str, file: &std::path::Path, clean: bool) {
        let mut command = Command::new("pg_restore");
        command.args(["-d", &self.url(database)]);
        if clean {
            command.args(["--clean", "--if-exists"]);
        }
        run(command.arg(file));
    }
}

/// Runs `command`, which must succeed; its standard output.
fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("pg_dropcluster")
            .args([&self.version, &self.name, "--stop"])
            .output();
    }
}

/// A TCP port nothing listens on now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
