-- DSQL builds indexes asynchronously: migrate waits for the job before the next statement,
-- which needs the finished index.
CREATE UNIQUE INDEX ASYNC accounts_email_key ON accounts (email);

ALTER TABLE accounts ADD CONSTRAINT accounts_email_key UNIQUE USING INDEX accounts_email_key;
