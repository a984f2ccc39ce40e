//! Reading catalogue events from messages and emitting them through the consumer's outbox.

use trialflow_outbox::OutboxEvent;
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{AnyEvent, Envelope, Event};

use crate::error::HandlerError;
use crate::handler::{Context, Message};

/// The event in `message`. Bytes that are not a known event can never be applied: permanent.
pub fn decode(message: &Message) -> Result<AnyEvent, HandlerError> {
    let payload = message.payload.as_deref().ok_or_else(|| HandlerError::permanent("empty payload"))?;
    trialflow_schemas::decode_any(payload)
        .map_err(|e| HandlerError::permanent(format!("undecodable {} message: {e}", message.topic)))
}

/// Queues `event` on its topic under `key` ([`Context::enqueue`]); it is published once the
/// batch's transaction commits.
pub fn emit<E: Event>(
    ctx: &mut Context,
    topics: &TopicNames,
    event: &E,
    key: &str,
) -> Result<(), HandlerError> {
    let row = OutboxEvent::avro(event, topics.of::<E>(), key)
        .map_err(|e| HandlerError::permanent(format!("encoding {}: {e}", E::NAME)))?;
    ctx.enqueue(row)
}

/// The subject an event is about (its envelope's subject id), or a permanent error naming the
/// event: a subject-keyed event without one can never be applied.
pub fn subject_of(envelope: &Envelope) -> Result<&str, HandlerError> {
    envelope
        .subject_id
        .as_deref()
        .ok_or_else(|| HandlerError::permanent(format!("{} without subject_id", envelope.event_type)))
}

/// The site an event is about, or a permanent error naming the event.
pub fn site_of(envelope: &Envelope) -> Result<&str, HandlerError> {
    envelope
        .site_id
        .as_deref()
        .ok_or_else(|| HandlerError::permanent(format!("{} without site_id", envelope.event_type)))
}

/// The "study configuration seen" dependency that messages arriving before their study park on.
/// The person whose request the event carries (its actor), for audit records of the changes it
/// causes: none when the actor is the system that wrote the event.
pub fn requested_by(envelope: &Envelope) -> Option<&str> {
    envelope.actor.as_deref().filter(|actor| *actor != envelope.source_system)
}

pub fn study_dependency(study_id: &str) -> String {
    format!("study:{study_id}")
}
