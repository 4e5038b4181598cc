//! `bq-rules`: the strict BigQuery rules layer in front of bqemulator (see
//! `shardflow_tests::bq_rules`). `tests/emulators.sh` starts it; the suite's
//! `BIGQUERY_EMULATOR_HOST` points at it.
//!
//!     bq-rules LISTEN UPSTREAM GCS GCS_ROOT
//!     bq-rules 127.0.0.1:9051 http://127.0.0.1:9050 http://127.0.0.1:4443 target/emulators/fake-gcs

use std::net::SocketAddr;
use std::path::PathBuf;

use shardflow_tests::bq_rules::proxy::{Config, Proxy};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, gcs, gcs_root] = args.as_slice() else {
        eprintln!("usage: bq-rules LISTEN UPSTREAM GCS GCS_ROOT");
        std::process::exit(2);
    };
    let listen: SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bq-rules: LISTEN {listen:?} is not an address: {e}");
            std::process::exit(2);
        }
    };
    let proxy = Proxy::new(Config {
        upstream: upstream.trim_end_matches('/').to_string(),
        gcs: gcs.trim_end_matches('/').to_string(),
        gcs_root: PathBuf::from(gcs_root),
    });
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bq-rules: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("bq-rules: strict rules layer on {listen}, in front of {upstream}");
    if let Err(e) = proxy.serve(listener).await {
        eprintln!("bq-rules: {e}");
        std::process::exit(1);
    }
}
