/* spool_ext--0.1--0.2.sql: update a 0.1 catalog to 0.2 (also the second step of a fresh 0.2 install) */

\echo Use "ALTER EXTENSION spool_ext UPDATE TO '0.2'" to load this file. \quit

-- A fresh install runs spool_ext--0.1.sql and then this file, so a fresh
-- catalog and an updated one are made by the same statements.  Every block
-- below must also work on a 0.1 catalog that holds data and whose workers
-- run (ALTER EXTENSION UPDATE takes no lock that stops them).
