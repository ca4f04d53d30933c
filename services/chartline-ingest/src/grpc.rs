//! The gRPC face: `chartline.v1.IngestService`.

use bytes::Bytes;
use chartline_proto::v1::ingest_service_server::{IngestService, IngestServiceServer};
use chartline_proto::v1::{
    IngestBundleRequest, IngestBundleResponse, IngestCounts, IngestNdjsonResponse, IngestResourceRequest,
    IngestResourceResponse, LineError, NdjsonChunk,
};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::{Counts, Ingestor, Interaction, Source};

/// `IngestService` over an [`Ingestor`].
#[derive(Clone, Debug)]
pub struct IngestGrpc {
    ingestor: Ingestor,
}

/// The tonic server for `IngestService`, accepting messages up to the ingestor's payload limit.
pub fn server(ingestor: Ingestor) -> IngestServiceServer<IngestGrpc> {
    let max = ingestor.limits().max_bytes.saturating_add(64 * 1024);
    IngestServiceServer::new(IngestGrpc { ingestor }).max_decoding_message_size(max)
}

fn source(s: Option<&chartline_proto::v1::Source>) -> Source {
    let sender = s.map(|s| s.sender.trim()).filter(|s| !s.is_empty()).unwrap_or("grpc");
    Source { sender: sender.chars().take(200).collect(), channel: "grpc" }
}

fn counts(c: &Counts) -> IngestCounts {
    IngestCounts { created: c.created, updated: c.updated, unchanged: c.unchanged, rejected: c.rejected }
}

#[tonic::async_trait]
impl IngestService for IngestGrpc {
    async fn ingest_bundle(&self, request: Request<IngestBundleRequest>) -> Result<Response<IngestBundleResponse>, Status> {
        let req = request.into_inner();
        let src = source(req.source.as_ref());
        let resp = self.ingestor.ingest_bundle(&req.bundle_json, &src).await?;
        Ok(Response::new(IngestBundleResponse { response_bundle_json: resp.bundle.into(), counts: Some(counts(&resp.counts)) }))
    }

    async fn ingest_resource(&self, request: Request<IngestResourceRequest>) -> Result<Response<IngestResourceResponse>, Status> {
        let req = request.into_inner();
        let src = source(req.source.as_ref());
        // With an id: create-or-update at that id; without: create.
        let probe: Option<(String, String)> = serde_json::from_slice::<serde_json::Value>(&req.resource_json)
            .ok()
            .and_then(|v| Some((v.get("resourceType")?.as_str()?.to_owned(), v.get("id")?.as_str()?.to_owned())));
        let interaction = match probe {
            Some((resource_type, id)) => Interaction::Update { resource_type, id },
            None => Interaction::Create { resource_type: None, if_none_exist: None },
        };
        let r = self.ingestor.ingest_resource(&req.resource_json, interaction, &src).await?;
        Ok(Response::new(IngestResourceResponse {
            resource_type: r.resource_type,
            id: r.id,
            version_id: r.version_id.to_string(),
            outcome: r.outcome.map(|o| o.as_str()).unwrap_or("matched").to_owned(),
        }))
    }

    async fn ingest_ndjson(&self, request: Request<Streaming<NdjsonChunk>>) -> Result<Response<IngestNdjsonResponse>, Status> {
        let mut stream = request.into_inner();
        // The first chunk names the sender.
        let first = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(s)) => return Err(s),
            None => return Ok(Response::new(IngestNdjsonResponse { counts: Some(IngestCounts::default()), errors: vec![] })),
        };
        let src = source(first.source.as_ref());
        let head = futures::stream::once(async move { Ok::<Bytes, Status>(first.data) });
        let rest = stream.map(|c| c.map(|c| c.data));
        let report = self.ingestor.ingest_ndjson(Box::pin(head.chain(rest)), &src).await?;
        Ok(Response::new(IngestNdjsonResponse {
            counts: Some(counts(&report.counts)),
            errors: report
                .errors
                .iter()
                .map(|e| LineError { line: e.line, operation_outcome_json: serde_json::to_vec(&e.outcome).unwrap_or_default().into() })
                .collect(),
        }))
    }
}
