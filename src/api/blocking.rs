//! The one way handlers run blocking work (a database call, a cold adapter
//! load, unpacking an archive): on the blocking pool, so the HTTP workers
//! keep answering while it runs.

use actix_web::web;

use super::error::ApiError;

/// Runs `work` off the HTTP workers and maps its error to the API's.
pub async fn blocking<T, E>(work: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    web::block(work)
        .await
        .map_err(|e| ApiError::internal(format!("a background task failed: {e}")))?
        .map_err(Into::into)
}
