-- A least-privilege PostgreSQL role for deptsync, and a read-only role for the people and
-- jobs that query its tables. deptsync's role can log in and connect to its database,
-- owns its own schema there (`deptsync`), and nothing else (not the database, no
-- superuser, no CREATEDB, no CREATEROLE).
--
-- Run as a superuser (it stops at the first error, and running it again is safe):
--     sudo -u postgres psql -v password=choose-one < deploy/postgres-setup.sql
-- The names are variables too, with these defaults:
--     -v owner=deptsync -v reader=deptsync_reader -v database=deptsync
-- Then put the URL in a credential file (see the README):
--     postgres://deptsync:choose-one@127.0.0.1:5432/deptsync
-- An analyst gets read access by the reader role:
--     CREATE ROLE alice LOGIN PASSWORD '…' IN ROLE deptsync_reader;   -- a new login
--     GRANT deptsync_reader TO alice;                                 -- or an existing one

\set ON_ERROR_STOP on
\if :{?owner}
\else
  \set owner deptsync
\endif
\if :{?reader}
\else
  \set reader deptsync_reader
\endif
\if :{?database}
\else
  \set database deptsync
\endif
\if :{?password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'give deptsync''s password: psql -v password=... < deploy/postgres-setup.sql'; END $$;
\endif

SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner') \gexec
ALTER ROLE :"owner" PASSWORD :'password';
SELECT format('CREATE ROLE %I NOLOGIN', :'reader')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'reader') \gexec
SELECT format('CREATE DATABASE %I', :'database')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') \gexec
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"database" TO :"owner", :"reader";
-- Everyone connecting to the database finds deptsync's tables by their plain names
-- (a role's own settings are not inherited by its members, so this is the database's).
ALTER DATABASE :"database" SET search_path = deptsync, public;

\connect :"database"

-- Nobody else creates objects in the public schema; deptsync's tables live in its own
-- schema, first on its search_path.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
CREATE SCHEMA IF NOT EXISTS deptsync AUTHORIZATION :"owner";
ALTER ROLE :"owner" IN DATABASE :"database" SET search_path = deptsync;

-- Read-only access to the synced tables: those there now, and those deptsync creates.
GRANT USAGE ON SCHEMA deptsync TO :"reader";
GRANT SELECT ON ALL TABLES IN SCHEMA deptsync TO :"reader";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA deptsync GRANT SELECT ON TABLES TO :"reader";
