//! The SMTP transport (lettre) or the demo's mailbox: where rendered email goes. Holds
//! the SMTP credentials and never logs them; decides nothing.

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, Tokio1Executor};

use crate::config::{EmailConfig, SmtpTls};
use crate::error::{Error, Result};

/// Where messages go.
pub enum Mailer {
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
    },
    /// The demo's mailbox page.
    DevMailbox,
}

impl Mailer {
    pub fn new(config: &EmailConfig) -> Result<Self> {
        if config.dev_mailbox {
            return Ok(Mailer::DevMailbox);
        }
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| Error::Internal(format!("email.from: {e}")))?;
        let host = config.smtp_host.clone().unwrap_or_default();
        let builder = match config.tls {
            SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&host)
                .map_err(|e| Error::Internal(format!("email.smtp_host: {e}")))?,
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&host)
                .map_err(|e| Error::Internal(format!("email.smtp_host: {e}")))?,
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host),
        };
        let mut builder = builder.timeout(Some(std::time::Duration::from_secs(10)));
        if let Some(port) = config.smtp_port {
            builder = builder.port(port);
        }
        let password = config
            .password()
            .map_err(|e| Error::Internal(e.to_string()))?;
        if let (Some(user), Some(pass)) = (&config.username, password) {
            builder =
                builder.credentials(Credentials::new(user.clone(), pass.expose().to_string()));
        }
        Ok(Mailer::Smtp {
            transport: builder.build(),
            from,
        })
    }
}
