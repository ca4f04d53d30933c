//! Gemma's chat template.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Who wrote a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions; Gemma has no system turn, so this is folded into the first user turn.
    System,
    /// The person asking.
    User,
    /// The model (Gemma's `model` turn).
    Assistant,
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// The author.
    pub role: Role,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// A model (assistant) message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// Renders a conversation with Gemma's chat template, ending with the open model turn:
///
/// ```text
/// <start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n
/// ```
///
/// As in Gemma's own template, a leading system message is folded into the first user turn
/// and each message's content is trimmed. The result has no `<bos>`: the engine adds it when
/// it tokenizes. After the optional system message, roles must alternate user / assistant,
/// starting and ending with the user.
///
/// Message text is not escaped: text containing `<end_of_turn>` or `<start_of_turn>` becomes
/// those control tokens.
pub fn chat_prompt(messages: &[ChatMessage]) -> Result<String> {
    let (system, turns) = match messages.split_first() {
        Some((first, rest)) if first.role == Role::System => (Some(first), rest),
        Some(_) => (None, messages),
        None => return Err(Error::invalid("messages", "must not be empty")),
    };
    let offset = usize::from(system.is_some());
    if turns.is_empty() {
        return Err(Error::invalid("messages", "must contain a user message"));
    }
    let mut out = String::new();
    for (i, message) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if message.role != expected {
            let reason = if message.role == Role::System {
                "must be user or assistant: only the first message may be a system message"
                    .to_owned()
            } else {
                format!(
                    "must be {} here: roles must alternate user/assistant, starting with user",
                    role_name(expected)
                )
            };
            return Err(Error::invalid(
                format!("messages[{}].role", i + offset),
                reason,
            ));
        }
        let role = if message.role == Role::User {
            "user"
        } else {
            "model"
        };
        out.push_str("<start_of_turn>");
        out.push_str(role);
        out.push('\n');
        if let (0, Some(system)) = (i, system) {
            out.push_str(&system.content);
            out.push_str("\n\n");
        }
        out.push_str(message.content.trim());
        out.push_str("<end_of_turn>\n");
    }
    if turns.len() % 2 == 0 {
        return Err(Error::invalid(
            format!("messages[{}].role", turns.len() - 1 + offset),
            "the last message must be from the user",
        ));
    }
    out.push_str("<start_of_turn>model\n");
    Ok(out)
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_user_turn_opens_a_model_turn() {
        let p = chat_prompt(&[ChatMessage::user("  Hi there \n")]);
        assert_eq!(
            p.ok().as_deref(),
            Some("<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n")
        );
    }

    #[test]
    fn system_text_is_folded_into_the_first_user_turn() {
        let p = chat_prompt(&[
            ChatMessage::system("Be brief."),
            ChatMessage::user("Q1"),
            ChatMessage::assistant("A1"),
            ChatMessage::user("Q2"),
        ]);
        assert_eq!(
            p.ok().as_deref(),
            Some(
                "<start_of_turn>user\nBe brief.\n\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n\
                 <start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n"
            )
        );
    }

    #[test]
    fn non_alternating_roles_are_rejected_naming_the_message() {
        let e = chat_prompt(&[ChatMessage::user("a"), ChatMessage::user("b")]);
        let e = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with("messages[1].role must be assistant"), "{e}");

        let e = chat_prompt(&[ChatMessage::system("s"), ChatMessage::assistant("a")]);
        assert_eq!(
            e.err()
                .and_then(|e| e.field().map(str::to_owned))
                .as_deref(),
            Some("messages[1].role")
        );
    }

    #[test]
    fn empty_or_system_only_or_model_last_is_rejected() {
        assert!(chat_prompt(&[]).is_err(), "empty conversation");
        assert!(
            chat_prompt(&[ChatMessage::system("s")]).is_err(),
            "system only"
        );
        assert!(
            chat_prompt(&[ChatMessage::user("q"), ChatMessage::assistant("a")]).is_err(),
            "conversation ending with the model"
        );
        assert!(
            chat_prompt(&[ChatMessage::user("q"), ChatMessage::system("s")]).is_err(),
            "late system message"
        );
    }
}
