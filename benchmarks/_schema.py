"""The table and the SQL function every benchmark uses."""

SCHEMA = """
DROP TABLE IF EXISTS items;
CREATE TABLE items (id bigserial PRIMARY KEY, k varchar(64) NOT NULL UNIQUE,
                    v varchar(200) NOT NULL);
INSERT INTO items (k, v) SELECT 'seed-' || g, repeat('x', 100) FROM generate_series(1, 1000) g;
CREATE OR REPLACE FUNCTION bench_slow(slow_port int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
  IF pg_is_in_recovery() AND inet_server_port() = slow_port THEN
    PERFORM pg_sleep(0.005);
  END IF;
  RETURN 1;
END $$;
ANALYZE items;
"""
