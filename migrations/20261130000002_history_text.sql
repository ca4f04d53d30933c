-- Version content is kept as the JSON text Chartline serialized, not as jsonb. Every
-- version was already parsed and validated by the ingest service; jsonb made PostgreSQL
-- parse it a second time and convert it back to text on every read, which was the
-- largest single cost of storing a Bundle (BENCHMARKS.md, "Ingest"). Reads get back the
-- text as written, key order included. Queries that need jsonb operators cast the few
-- rows they look at (`content::jsonb`).
alter table resource_history alter column content type text using content::text;
do $$
begin
    alter table resource_history alter column content set compression lz4;
exception when feature_not_supported then
    raise notice 'lz4 is not available in this server; resource_history.content keeps the default compression';
end
$$;
