-- Version content is compressed with lz4 instead of pglz: several times cheaper to write
-- (pglz was the largest single cost of storing a Bundle after parsing the JSON) and as
-- cheap to read. Only new values are affected. A server built without lz4 keeps pglz.
do $$
begin
    alter table resource_history alter column content set compression lz4;
exception when feature_not_supported then
    raise notice 'lz4 is not available in this server; resource_history.content keeps the default compression';
end
$$;
