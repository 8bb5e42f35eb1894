//! Counts the OS API's calls by method and gRPC status, and times them: a
//! tower layer on the tonic server, outside the authorization layer, so
//! refused calls are counted too (with the code they were refused with).
//!
//! The status is read where gRPC puts it: the `grpc-status` header of a
//! trailers-only reply (every error, and every refusal by
//! [`super::authz`]), else the trailers that end the reply body. A body
//! dropped before its trailers (the client went away, the server stopped)
//! counts as `Cancelled`. The duration is from the request's arrival to
//! the reply's headers, which for a unary call is the handler's time and
//! for a stream (`logs -f`) the time to its first reply.
//!
//! The method label is the gRPC path when the authorization table knows
//! it, else `other`: a client with a valid certificate must not be able to
//! grow the label set without bound by calling made-up paths.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;

use super::metrics::api_metrics;

/// The layer; see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetricsLayer;

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Metered<S> {
        Metered { inner }
    }
}

/// See [`MetricsLayer`].
#[derive(Clone, Debug)]
pub struct Metered<S> {
    inner: S,
}

/// The label for `path`: itself when it is an RPC of the API, else `other`.
pub fn method_label(path: &str) -> &'static str {
    super::authz::RULES
        .iter()
        .find(|r| r.path == path)
        .map_or("other", |r| r.path)
}

/// gRPC's name of a numeric `grpc-status`.
pub fn code_name(status: &str) -> &'static str {
    match status.trim().parse::<i32>() {
        Ok(n) => match tonic::Code::from_i32(n) {
            tonic::Code::Ok => "OK",
            tonic::Code::Cancelled => "Cancelled",
            tonic::Code::Unknown => "Unknown",
            tonic::Code::InvalidArgument => "InvalidArgument",
            tonic::Code::DeadlineExceeded => "DeadlineExceeded",
            tonic::Code::NotFound => "NotFound",
            tonic::Code::AlreadyExists => "AlreadyExists",
            tonic::Code::PermissionDenied => "PermissionDenied",
            tonic::Code::ResourceExhausted => "ResourceExhausted",
            tonic::Code::FailedPrecondition => "FailedPrecondition",
            tonic::Code::Aborted => "Aborted",
            tonic::Code::OutOfRange => "OutOfRange",
            tonic::Code::Unimplemented => "Unimplemented",
            tonic::Code::Internal => "Internal",
            tonic::Code::Unavailable => "Unavailable",
            tonic::Code::DataLoss => "DataLoss",
            tonic::Code::Unauthenticated => "Unauthenticated",
        },
        Err(_) => "Unknown",
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<&'static str> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(code_name)
}

impl<S, B> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            api_metrics().observe_latency(method, start.elapsed().as_secs_f64());
            if let Some(code) = status_of(resp.headers()) {
                api_metrics().count(method, code);
                return Ok(resp);
            }
            Ok(resp.map(|inner| {
                tonic::body::Body::new(Counted {
                    inner,
                    method,
                    counted: false,
                })
            }))
        })
    }
}

/// A reply body that counts its call once its trailers pass (or it is
/// dropped without them).
struct Counted {
    inner: tonic::body::Body,
    method: &'static str,
    counted: bool,
}

impl Counted {
    fn count(&mut self, code: &'static str) {
        if !self.counted {
            self.counted = true;
            api_metrics().count(self.method, code);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.count("Cancelled");
    }
}

impl http_body::Body for Counted {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    self.count(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.count("Internal"),
            // The end without trailers: not gRPC's way to finish a call.
            Poll::Ready(None) => self.count("Unknown"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            method_label("/machine.v1alpha1.MachineService/Version"),
            "/machine.v1alpha1.MachineService/Version"
        );
        assert_eq!(method_label("/made.up/Path"), "other");
        assert_eq!(code_name("0"), "OK");
        assert_eq!(code_name("7"), "PermissionDenied");
        assert_eq!(code_name("junk"), "Unknown");
        assert_eq!(code_name("99"), "Unknown");
    }
}
