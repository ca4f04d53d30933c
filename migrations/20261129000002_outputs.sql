-- AI outputs, their provenance (append-only, hash-chained), the summary job queue and
-- CDS Hooks feedback.

-- Work ahead of the hook: one pending summary job per patient, debounced by not_before.
-- Ingest upserts it in the same transaction as the data; workers lease with SKIP LOCKED.
create table summary_job (
    patient_id text primary key,
    -- Bumped on every enqueue: a worker deletes the job only if no newer data arrived.
    generation bigint not null default 1,
    enqueued_at timestamptz not null default now(),
    not_before timestamptz not null default now(),
    attempts integer not null default 0,
    lease_until timestamptz,
    leased_by text,
    last_error text,
    created_at timestamptz not null default now()
);
create index summary_job_ready on summary_job (not_before);

create table ai_output (
    id uuid primary key,
    patient_id text not null,
    task text not null,
    narrative text not null,
    -- The deterministic IPS sections built from the timeline: [{key, title, loinc, text}].
    sections jsonb not null,
    -- Citation check: [{text, citations, supported}] and the counts.
    statements jsonb not null,
    citations_found integer not null,
    citations_verified integer not null,
    unsupported_statements integer not null,
    output_sha256 bytea not null,
    finish_reason text not null,
    -- The newest resource change of the patient the output saw (for "newer data" notes).
    data_as_of timestamptz,
    created_at timestamptz not null default now()
);
create index ai_output_patient on ai_output (patient_id, created_at desc);

-- One row per output. Each row stores the sha256 of its own canonical content and the
-- previous row's hash, so any edit breaks the chain from that row on.
create table provenance (
    seq bigint generated always as identity primary key,
    output_id uuid not null unique references ai_output (id),
    model_name text not null,
    backend text not null,
    weights_sha256 text not null,
    tokenizer_sha256 text not null,
    template_version text not null,
    prompt_sha256 text not null,
    prompt_text text not null,
    -- [{resource_type, id, version_id}] sorted.
    inputs jsonb not null,
    -- Generation parameters, seed included.
    parameters jsonb not null,
    requester text not null,
    started_at timestamptz not null,
    finished_at timestamptz not null,
    latency_ms bigint not null,
    output_sha256 text not null,
    content_sha256 bytea not null,
    prev_hash bytea not null,
    row_hash bytea not null,
    created_at timestamptz not null default now()
);

-- Append-only: no UPDATE or DELETE through normal use (the trigger), and the service role
-- gets no such privilege either.
create function provenance_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'provenance is append-only';
end $$;
create trigger provenance_no_update before update or delete on provenance
    for each row execute function provenance_append_only();

-- Roles are cluster-wide: another database's migration may create it at the same moment.
do $$
begin
    create role chartline_service nologin;
exception when duplicate_object or unique_violation then
    null;
end $$;
grant select, insert on provenance to chartline_service;
revoke update, delete, truncate on provenance from chartline_service;

create table cds_feedback (
    id bigint generated always as identity primary key,
    service_id text not null,
    card_uuid text not null,
    outcome text not null,
    outcome_timestamp timestamptz,
    -- Override reasons etc., as sent (no patient content by the spec's shape).
    detail jsonb not null,
    created_at timestamptz not null default now()
);
