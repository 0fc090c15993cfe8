//! For brokers that keep broadcasts as rows of one table (SQLite, PostgreSQL, MariaDB/MySQL):
//! the channel a row belongs to ([`Channel`], its `channel` column) and which rows of it an
//! inbox takes ([`RowFilter`]).

use super::{CONTROL_EXCHANGE, EVENT_EXCHANGE, REPLY_EXCHANGE, topic_matches};

/// The three broadcast channels, as a table's `channel` column names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Remote-control requests.
    Control,
    /// Replies to them.
    Reply,
    /// Events.
    Event,
}

impl Channel {
    /// The value of the `channel` column.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Control => "control",
            Channel::Reply => "reply",
            Channel::Event => "event",
        }
    }

    /// The exchange Celery would publish such a message to, written in the envelope.
    pub fn exchange(self) -> &'static str {
        match self {
            Channel::Control => CONTROL_EXCHANGE,
            Channel::Reply => REPLY_EXCHANGE,
            Channel::Event => EVENT_EXCHANGE,
        }
    }
}

/// Which rows of its channel an inbox takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowFilter {
    /// Every row (control requests).
    All,
    /// Rows with exactly this routing key (a reply queue): the read selects them by key.
    Key(String),
    /// Rows whose routing key matches this topic pattern (an event binding): the read takes
    /// every row and [`RowFilter::keeps`] picks.
    Topic(String),
}

impl RowFilter {
    /// The routing key the read selects by, for [`RowFilter::Key`].
    pub fn key(&self) -> Option<&str> {
        match self {
            RowFilter::Key(k) => Some(k),
            _ => None,
        }
    }

    /// Whether a row read with routing key `routing_key` is for this inbox.
    pub fn keeps(&self, routing_key: &str) -> bool {
        match self {
            RowFilter::All => true,
            RowFilter::Key(k) => k == routing_key,
            RowFilter::Topic(t) => topic_matches(t, routing_key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_keep_their_rows() {
        assert!(RowFilter::All.keeps("anything"));
        let key = RowFilter::Key("k1".into());
        assert_eq!(key.key(), Some("k1"));
        assert!(key.keeps("k1") && !key.keeps("k2"));
        let topic = RowFilter::Topic("task.*".into());
        assert_eq!(topic.key(), None);
        assert!(topic.keeps("task.succeeded") && !topic.keeps("worker.heartbeat"));
        assert_eq!(Channel::Event.name(), "event");
        assert_eq!(Channel::Control.exchange(), CONTROL_EXCHANGE);
    }
}
