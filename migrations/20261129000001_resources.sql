-- Resources, every version of them, the identifier index for conditional references,
-- the flat patient_event index for timelines, and the ingest log.

-- The current version of each resource. Content lives only in resource_history (the
-- current row points at its version), so each version's JSON is written once.
create table resource (
    resource_type text not null,
    id text not null,
    version_id bigint not null,
    last_updated timestamptz not null,
    -- sha256 of the canonical content without meta.versionId/lastUpdated: equal hash, no new version.
    sha256 bytea not null,
    -- The patient whose compartment holds the resource (the Patient itself for a Patient).
    patient_id text,
    deleted boolean not null default false,
    created_at timestamptz not null default now(),
    primary key (resource_type, id)
);
create index resource_patient_idx on resource (patient_id) where patient_id is not null;

-- Every version ever stored, as stored (ids assigned, references resolved, meta set).
create table resource_history (
    resource_type text not null,
    id text not null,
    version_id bigint not null,
    last_updated timestamptz not null,
    sha256 bytea not null,
    -- null for a delete.
    content jsonb,
    patient_id text,
    ingest_id bigint,
    created_at timestamptz not null default now(),
    primary key (resource_type, id, version_id)
);

-- Identifiers of current versions, for `Type?identifier=system|value` and ifNoneExist.
create table resource_identifier (
    resource_type text not null,
    id text not null,
    system text not null,
    value text not null,
    created_at timestamptz not null default now()
);
create index resource_identifier_lookup on resource_identifier (resource_type, value, system);
create index resource_identifier_owner on resource_identifier (resource_type, id);

-- One row per timeline fact of a current resource version (Observation components get
-- rows of their own), so a timeline is one indexed SELECT.
create table patient_event (
    event_id bigint generated always as identity primary key,
    patient_id text not null,
    resource_type text not null,
    resource_id text not null,
    version_id bigint not null,
    component integer not null default 0,
    kind text not null,
    event_time timestamptz,
    end_time timestamptz,
    category text,
    code_system text,
    code text,
    display text,
    value_num double precision,
    value_text text,
    unit text,
    ref_low double precision,
    ref_high double precision,
    interpretation text,
    status text,
    created_at timestamptz not null default now()
);
create index patient_event_timeline on patient_event (patient_id, event_time, kind);
create index patient_event_resource on patient_event (resource_type, resource_id);

-- Who sent what, when, and how it ended. Issues carry paths and rules, never content.
create table ingest_log (
    id bigint generated always as identity primary key,
    received_at timestamptz not null default now(),
    sender text not null,
    channel text not null,
    kind text not null,
    payload_bytes bigint not null,
    payload_sha256 bytea not null,
    outcome text not null,
    created integer not null default 0,
    updated integer not null default 0,
    unchanged integer not null default 0,
    rejected integer not null default 0,
    issues jsonb,
    created_at timestamptz not null default now()
);
create index ingest_log_received on ingest_log (received_at);
