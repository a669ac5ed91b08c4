//! Chat templates: the model's Jinja `chat_template` rendered with
//! minijinja (with Python string methods), or a plain fallback.

use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use super::ModelError;

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    has_model_template: bool,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("has_model_template", &self.has_model_template)
            .finish()
    }
}

/// Used when the model ships no template: role-tagged lines, then the
/// assistant's turn.
const FALLBACK_TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

impl ChatTemplate {
    /// Compiles `template`, or the fallback when `None`.
    pub fn new(
        template: Option<&str>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        let source = template.unwrap_or(FALLBACK_TEMPLATE).to_string();
        env.add_template_owned("chat", source)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            has_model_template: template.is_some(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Whether the model provided its own template.
    pub fn has_model_template(&self) -> bool {
        self.has_model_template
    }

    /// Renders the conversation with the generation prompt appended.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ModelError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chatml_template_with_python_methods_renders() {
        let t = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let c = ChatTemplate::new(Some(t), "", "<|im_end|>").unwrap();
        let out = c.render(&[msg("user", " hi ")]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}x";
        let c = ChatTemplate::new(Some(t), "", "").unwrap();
        let e = c.render(&[msg("assistant", "a")]).unwrap_err();
        assert!(e.to_string().contains("first must be user"));
    }

    #[test]
    fn fallback_names_roles_and_opens_the_assistant_turn() {
        let c = ChatTemplate::new(None, "", "").unwrap();
        assert_eq!(
            c.render(&[msg("user", "hi")]).unwrap(),
            "user: hi\nassistant:"
        );
    }
}
