//! Client request ids. Every mutating call carries one; its answer is stored in the catalog in
//! the same transaction as what the call created (or, for calls that change no row, in one of
//! its own), exactly once, so that a retry gets the first answer and nothing happens twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::catalog::{RequestRecord, Tx};
use crate::error::{Error, Result};

/// A request being answered.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    /// The client's id.
    pub request_id: String,
    /// The RPC.
    pub method: &'static str,
    /// The request without its id, encoded: a retry must match it.
    pub fingerprint: Vec<u8>,
    /// Who asked (see [`crate::auth`]).
    pub caller: String,
    /// Set once the caller gave up (it cancelled the call, its deadline passed, or it went
    /// away): work that can stop early stops.
    pub abandoned: Arc<AtomicBool>,
}

/// Marks its request abandoned when dropped before [`CallerWaits::answered`]: the call's
/// future is dropped when its client cancels, disconnects or runs out of time.
#[derive(Debug)]
pub struct CallerWaits(Option<Arc<AtomicBool>>);

impl CallerWaits {
    /// Watches `ctx`'s caller.
    pub fn new(ctx: &RequestCtx) -> Self {
        Self(Some(Arc::clone(&ctx.abandoned)))
    }

    /// The call was answered: nothing to mark.
    pub fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for CallerWaits {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

impl RequestCtx {
    /// Whether the caller gave up.
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// Stores `response` as the answer, inside the transaction that made it.
    ///
    /// # Errors
    /// The catalog's error.
    pub fn answer(
        &self,
        tx: &Tx<'_>,
        response: &impl prost::Message,
    ) -> std::result::Result<(), crate::catalog::CatalogError> {
        let record = RequestRecord {
            method: self.method.into(),
            fingerprint: self.fingerprint.clone(),
            response: response.encode_to_vec(),
        };
        tx.put_request(&self.request_id, &record, crate::now_ms())
    }

    /// The stored answer if this request id was answered before; ALREADY_EXISTS if it was used
    /// for a different request.
    ///
    /// # Errors
    /// ALREADY_EXISTS, or the catalog's error.
    pub fn answered(&self, catalog: &crate::catalog::Catalog) -> Result<Option<Vec<u8>>> {
        match catalog.read(|tx| tx.request(&self.request_id))? {
            None => Ok(None),
            Some(r) if r.method == self.method && r.fingerprint == self.fingerprint => {
                Ok(Some(r.response))
            }
            Some(r) => Err(Error::exists(format!(
                "request id {:?} was already used for a different {} request: use a new request id \
                 for a new action",
                self.request_id, r.method
            ))),
        }
    }
}
