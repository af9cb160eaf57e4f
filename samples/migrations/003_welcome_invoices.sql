-- A block the file wraps in BEGIN ... COMMIT runs as one transaction (DML only, as DSQL requires).
BEGIN;
INSERT INTO invoices (account_id, cents) SELECT id, 0 FROM accounts WHERE plan = 'pro';
UPDATE accounts SET plan = 'pro' WHERE email = 'alan@example.com';
COMMIT;

-- Semicolons inside strings, dollar quotes and comments never split a statement.
COMMENT ON TABLE invoices IS $$One row per invoice; amounts in cents.$$;
