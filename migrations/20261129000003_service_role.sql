-- What the service role may do: read and write the data tables, but only read and append
-- provenance and outputs (deployments connect as a login role granted chartline_service).
grant select, insert, update, delete on resource, resource_history, resource_identifier, patient_event,
    ingest_log, summary_job, cds_feedback to chartline_service;
grant select, insert on ai_output, provenance to chartline_service;
grant usage, select on all sequences in schema public to chartline_service;
