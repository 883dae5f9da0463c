-- A least-privilege PostgreSQL role for deptsync: it can log in and connect to its
-- database, owns its own schema there, and nothing else (not the database, no superuser,
-- no CREATEDB, no CREATEROLE).
--
-- Run as a superuser:   sudo -u postgres psql -v password="'choose-one'" < deploy/postgres-setup.sql
-- Then put the URL in a credential file (see the README):
--                       postgres://deptsync:choose-one@127.0.0.1:5432/deptsync

CREATE ROLE deptsync LOGIN PASSWORD :password NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
CREATE ROLE deptsync_reader NOLOGIN;
CREATE DATABASE deptsync;
REVOKE ALL ON DATABASE deptsync FROM PUBLIC;
GRANT CONNECT ON DATABASE deptsync TO deptsync, deptsync_reader;

\connect deptsync

-- Nobody else creates objects in the public schema; deptsync's tables live in its own
-- schema, found first on its search_path.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
CREATE SCHEMA deptsync AUTHORIZATION deptsync;
ALTER ROLE deptsync IN DATABASE deptsync SET search_path = deptsync;

-- Analysts: read-only access to the synced tables.
GRANT USAGE ON SCHEMA deptsync TO deptsync_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE deptsync IN SCHEMA deptsync GRANT SELECT ON TABLES TO deptsync_reader;
-- GRANT deptsync_reader TO some_analyst;
