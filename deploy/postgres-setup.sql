-- A least-privilege PostgreSQL role for deptsync: it can log in, owns its own schema in
-- its own database, and nothing else (no superuser, no CREATEDB, no CREATEROLE).
--
-- Run as a superuser:   psql -v password="'choose-one'" -f deploy/postgres-setup.sql
-- Then configure:       url = "postgres://deptsync:choose-one@127.0.0.1:5432/deptsync"
-- (or keep the URL with its password in a credential: url_file = "database-url").

CREATE ROLE deptsync LOGIN PASSWORD :password NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
CREATE DATABASE deptsync OWNER deptsync;

\connect deptsync

-- Nobody else creates objects in the public schema; deptsync's tables live in its own
-- schema, found first on its search_path.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
CREATE SCHEMA deptsync AUTHORIZATION deptsync;
ALTER ROLE deptsync IN DATABASE deptsync SET search_path = deptsync;

-- Analysts: read-only access to the synced tables.
CREATE ROLE deptsync_reader NOLOGIN;
GRANT USAGE ON SCHEMA deptsync TO deptsync_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE deptsync IN SCHEMA deptsync GRANT SELECT ON TABLES TO deptsync_reader;
-- GRANT deptsync_reader TO some_analyst;
