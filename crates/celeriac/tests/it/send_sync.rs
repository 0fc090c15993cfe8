//! Every public handle can cross threads.

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn public_handles_are_send_and_sync() {
    assert_send_sync::<celeriac::App>();
    assert_send_sync::<celeriac::AsyncResult<i64>>();
    assert_send_sync::<celeriac::Signature<i64>>();
    assert_send_sync::<celeriac::DynBroker>();
    assert_send_sync::<celeriac::DynBackend>();
    assert_send_sync::<celeriac::worker::Worker>();
    assert_send_sync::<celeriac::worker::ShutdownHandle>();
    assert_send_sync::<celeriac::TaskContext>();
    assert_send_sync::<celeriac::Error>();
}
