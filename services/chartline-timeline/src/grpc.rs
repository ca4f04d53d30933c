//! The gRPC face: `chartline.v1.TimelineService`.

use chartline_proto::v1::timeline_service_server::{TimelineService, TimelineServiceServer};
use chartline_proto::v1::{
    Attachment, BuildPromptRequest, BuildPromptResponse, GetAttachmentRequest, GetTimelineRequest, GetTimelineResponse,
    PromptImage, PromptSection, ResourceRef, TimelineEvent,
};
use chartline_store::EventFilter;
use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use crate::{Citation, PromptOptions, Timeline, TimelineError};

/// `TimelineService` over a [`Timeline`].
#[derive(Clone)]
pub struct TimelineGrpc {
    timeline: Timeline,
}

/// The tonic server for `TimelineService`.
pub fn server(timeline: Timeline) -> TimelineServiceServer<TimelineGrpc> {
    TimelineServiceServer::new(TimelineGrpc { timeline })
}

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn from_ts(t: &prost_types::Timestamp, field: &str) -> Result<DateTime<Utc>, Status> {
    let nanos = u32::try_from(t.nanos).map_err(|_| Status::invalid_argument(format!("{field} has negative nanos")))?;
    DateTime::from_timestamp(t.seconds, nanos).ok_or_else(|| Status::invalid_argument(format!("{field} is out of range")))
}

const KINDS: &[&str] = &[
    "condition", "observation", "medication", "allergy", "immunization", "procedure", "encounter",
    "diagnostic-report", "document", "care-plan", "imaging-study", "media",
];

#[tonic::async_trait]
impl TimelineService for TimelineGrpc {
    async fn get_timeline(&self, request: Request<GetTimelineRequest>) -> Result<Response<GetTimelineResponse>, Status> {
        let req = request.into_inner();
        if let Some(k) = req.kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
            return Err(Status::invalid_argument(format!("kinds: unknown kind {k:?}; known: {}", KINDS.join(", "))));
        }
        let filter = EventFilter {
            from: req.from.as_ref().map(|t| from_ts(t, "from")).transpose()?,
            to: req.to.as_ref().map(|t| from_ts(t, "to")).transpose()?,
            kinds: req.kinds.clone(),
        };
        let events = self.timeline.events(&req.patient_id, &filter).await?;
        let events = events
            .into_iter()
            .map(|e| TimelineEvent {
                kind: e.kind,
                time: e.time.map(ts),
                end_time: e.end_time.map(ts),
                category: e.category.unwrap_or_default(),
                code_system: e.code_system.unwrap_or_default(),
                code: e.code.unwrap_or_default(),
                display: e.display.unwrap_or_default(),
                value: e.value_num,
                value_text: e.value_text.unwrap_or_default(),
                unit: e.unit.unwrap_or_default(),
                status: e.status.unwrap_or_default(),
                interpretation: e.interpretation.unwrap_or_default(),
                ref_low: e.ref_low,
                ref_high: e.ref_high,
                source: Some(ResourceRef { resource_type: e.resource_type, id: e.resource_id, version_id: e.version_id }),
                component: e.component,
            })
            .collect();
        Ok(Response::new(GetTimelineResponse { patient_id: req.patient_id, events }))
    }

    async fn build_prompt(&self, request: Request<BuildPromptRequest>) -> Result<Response<BuildPromptResponse>, Status> {
        let req = request.into_inner();
        let as_of = match &req.as_of {
            Some(t) => from_ts(t, "as_of")?,
            None => Utc::now(),
        };
        let task = if req.task.is_empty() { "chart_summary" } else { req.task.as_str() };
        let options = PromptOptions { max_images: req.max_images, image_tokens: req.image_tokens };
        let p = self.timeline.build_prompt_with(&req.patient_id, task, i64::from(req.token_budget), as_of, options).await?;
        Ok(Response::new(to_proto(&p)))
    }

    async fn get_attachment(&self, request: Request<GetAttachmentRequest>) -> Result<Response<Attachment>, Status> {
        let req = request.into_inner();
        let Some(source) = req.source else { return Err(Status::invalid_argument("source is required")) };
        let version = match source.version_id {
            0 => None,
            v => Some(v),
        };
        let a = self.timeline.attachment(&source.resource_type, &source.id, version, req.attachment_index as usize).await?;
        Ok(Response::new(Attachment {
            content_type: a.content_type,
            data: a.data.into(),
            sha256: a.sha256,
            source: Some(resource_ref(&a.source)),
        }))
    }
}

fn resource_ref(c: &Citation) -> ResourceRef {
    ResourceRef { resource_type: c.resource_type.clone(), id: c.id.clone(), version_id: c.version_id }
}

/// The wire form of a prompt.
pub fn to_proto(p: &crate::Prompt) -> BuildPromptResponse {
    BuildPromptResponse {
        prompt: p.text.clone(),
        sections: p
            .sections
            .iter()
            .map(|s| PromptSection {
                key: s.key.to_owned(),
                title: s.title.to_owned(),
                loinc: s.loinc.to_owned(),
                text: s.text.clone(),
                token_count: s.token_count as u32,
                lines_included: s.lines_included as u32,
                lines_omitted: s.lines_omitted as u32,
            })
            .collect(),
        token_count: p.token_count as u32,
        tokenizer: p.tokenizer.clone(),
        citations: p.citations.iter().map(resource_ref).collect(),
        omitted: p.omitted.iter().map(|(k, v)| (k.clone(), *v as u32)).collect(),
        template_version: p.template_version.to_owned(),
        prompt_sha256: p.sha256.clone(),
        task: p.task.name().to_owned(),
        as_of: Some(ts(p.as_of)),
        images: p
            .images
            .iter()
            .map(|i| PromptImage {
                source: Some(resource_ref(&i.source)),
                attachment_index: i.attachment_index as u32,
                content_type: i.content_type.clone(),
                title: i.title.clone(),
                date: i.date.map(ts),
                size: i.size,
                sha256: i.sha256.clone(),
                placeholder_index: i.placeholder_index as u32,
            })
            .collect(),
    }
}

impl From<TimelineError> for Box<Status> {
    fn from(e: TimelineError) -> Self {
        Box::new(e.into())
    }
}
