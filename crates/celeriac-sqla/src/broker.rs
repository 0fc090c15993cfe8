//! stub
use celeriac_core::{Config, Result};
/// stub
#[derive(Debug, Clone)]
pub struct SqlaBroker;
/// stub
#[derive(Debug, Clone, Default)]
pub struct SqlaBrokerOptions;
impl SqlaBroker {
    /// stub
    pub async fn connect(_url: &str, _config: &Config) -> Result<std::sync::Arc<dyn celeriac_core::Broker>> { todo!() }
}
