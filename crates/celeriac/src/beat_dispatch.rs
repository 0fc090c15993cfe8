//! `App` sends beat's tasks: [`celeriac_beat::Dispatch`] for [`App`].

use celeriac_beat::{Dispatch, Firing};
use celeriac_core::BoxFuture;
use serde_json::Value;

use crate::{App, Result, Signature};

impl Dispatch for App {
    /// An ordinary protocol-2 message with the entry's arguments and options, the id beat
    /// recorded, and the header `celery_beat_task: true` (as Celery 5.7 sends).
    fn send<'a>(&'a self, firing: &'a Firing) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            Signature::<Value>::new(&firing.task)
                .with_options(firing.options.clone())
                .args_json(firing.args.clone())
                .kwargs_json(firing.kwargs.clone())
                .task_id(&firing.task_id)
                .header("celery_beat_task", true)
                .apply_async(self)
                .await
                .map(|_| ())
        })
    }

    /// Known when registered; `None` (cannot tell) when the app registers no task at all,
    /// as a beat-only binary does.
    fn knows_task(&self, task: &str) -> Option<bool> {
        if self.registry().is_empty() {
            None
        } else {
            Some(self.registry().get(task).is_some())
        }
    }
}
