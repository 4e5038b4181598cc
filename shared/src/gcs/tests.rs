use super::*;
use object_store::ObjectStoreExt as _;

#[cfg(feature = "service-tests")]
const START: &str = "start the emulators with eval \"$(bash tests/emulators.sh start)\"";

/// A new bucket on the GCS emulator; fails (never skips) when the emulator is not there.
#[cfg(feature = "service-tests")]
pub(crate) async fn emulator_bucket() -> String {
    let Some(base) = crate::staging::storage_emulator_url() else {
        panic!("STORAGE_EMULATOR_HOST is not set: {START}");
    };
    let bucket = format!("sf-{}", uuid::Uuid::new_v4().simple());
    let project = std::env::var("GCP_PROJECT_ID").unwrap_or_else(|_| "test-proj".into());
    let response = reqwest::Client::new()
        .post(format!("{base}/storage/v1/b?project={project}"))
        .json(&serde_json::json!({ "name": bucket }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("the GCS emulator at {base} does not answer ({e}): {START}"));
    assert!(
        response.status().is_success(),
        "creating bucket {bucket}: {}",
        response.status()
    );
    bucket
}

/// An object's bytes as a plain HTTP client downloads them, or None when it is absent.
#[cfg(feature = "service-tests")]
pub(crate) async fn read_raw(bucket: &str, name: &str) -> Option<Vec<u8>> {
    let base = crate::staging::storage_emulator_url().expect("STORAGE_EMULATOR_HOST");
    let store = GcsStore::new(&base, bucket, GcsAuth::Anonymous);
    let mut url = store.inner.object_url(&Path::from(name)).unwrap();
    url.query_pairs_mut().append_pair("alt", "media");
    let response = reqwest::get(url).await.unwrap();
    match response.status() {
        StatusCode::NOT_FOUND => None,
        s if s.is_success() => Some(response.bytes().await.unwrap().to_vec()),
        s => panic!("downloading {name}: {s}"),
    }
}

#[cfg(feature = "service-tests")]
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 249) as u8 ^ seed).collect()
}

/// A GCS that does not answer is named (scheme, host, port) with the cause, after the
/// retries a transient failure gets.
#[tokio::test]
async fn an_unreachable_gcs_is_named_with_the_cause() {
    let port = crate::net::closed_port();
    let store = GcsStore::new(&format!("http://127.0.0.1:{port}"), "b", GcsAuth::Anonymous);
    let err = store
        .head(&Path::from("run/part-00000.parquet"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "run/part-00000.parquet: GCS at http://127.0.0.1:{port}: connection refused \
             (nothing listens there)"
        )),
        "{text}"
    );
}

/// Every operation the pipeline uses, against the emulator over the JSON API.
#[cfg(feature = "service-tests")]
#[tokio::test]
async fn the_json_api_store_round_trips_against_the_emulator() {
    let bucket = emulator_bucket().await;
    let store = GcsStore::from_env(&bucket).unwrap();

    // Small objects, names with spaces and unicode.
    let odd = Path::from("dir a/ünï cödé 🚀.bin");
    store
        .put(&odd, PutPayload::from(pattern(1000, 1)))
        .await
        .unwrap();
    let got = store.get(&odd).await.unwrap();
    assert_eq!(got.meta.size, 1000);
    assert_eq!(got.meta.location, odd);
    assert!(got.meta.version.is_some(), "the generation is the version");
    assert_eq!(
        got.bytes().await.unwrap().as_ref(),
        pattern(1000, 1).as_slice()
    );
    assert_eq!(
        store.get_range(&odd, 10..20).await.unwrap().as_ref(),
        &pattern(1000, 1)[10..20]
    );
    assert_eq!(store.head(&odd).await.unwrap().size, 1000);

    // Resumable uploads: parts that are not 256 KiB multiples, run concurrently by
    // object_store, must land in order; an empty upload is an empty object.
    for (name, part_sizes) in [
        ("big/a.bin", vec![300_000, 1, 700_000, 262_144, 5]),
        ("big/b.bin", vec![3 * 262_144]),
        ("big/empty.bin", vec![]),
    ] {
        let mut upload = store.put_multipart(&Path::from(name)).await.unwrap();
        let mut expected = Vec::new();
        let mut pending = Vec::new();
        for (i, size) in part_sizes.iter().enumerate() {
            let part = pattern(*size, i as u8);
            expected.extend_from_slice(&part);
            pending.push(tokio::spawn(upload.put_part(PutPayload::from(part))));
        }
        // Parts finish in any order.
        for p in pending.into_iter().rev() {
            p.await.unwrap().unwrap();
        }
        upload.complete().await.unwrap();
        let read = store
            .get(&Path::from(name))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(
            read.as_ref() == expected.as_slice(),
            "{name}: {} bytes back",
            read.len()
        );
        assert_eq!(read_raw(&bucket, name).await, Some(expected));
    }

    // Listing: recursive and by level.
    use futures::TryStreamExt;
    let mut all: Vec<String> = store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    all.sort();
    assert_eq!(
        all,
        ["big/a.bin", "big/b.bin", "big/empty.bin", odd.as_ref()]
    );
    let under_big: Vec<(String, u64)> = store
        .list(Some(&Path::from("big")))
        .map_ok(|m| (m.location.to_string(), m.size))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(under_big.len(), 3);
    assert!(under_big.contains(&("big/empty.bin".to_string(), 0)));
    let top = store.list_with_delimiter(None).await.unwrap();
    assert!(top.objects.is_empty());
    let mut prefixes: Vec<String> = top.common_prefixes.iter().map(|p| p.to_string()).collect();
    prefixes.sort();
    assert_eq!(prefixes, ["big", "dir a"]);

    // Copy, then delete; a missing object is NotFound.
    store
        .copy(&Path::from("big/b.bin"), &Path::from("copy/b.bin"))
        .await
        .unwrap();
    assert_eq!(
        read_raw(&bucket, "copy/b.bin").await,
        Some(pattern(3 * 262_144, 0))
    );
    store.delete(&Path::from("copy/b.bin")).await.unwrap();
    assert_eq!(read_raw(&bucket, "copy/b.bin").await, None);
    match store.get(&Path::from("copy/b.bin")).await {
        Err(object_store::Error::NotFound { path, .. }) => assert_eq!(path, "copy/b.bin"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    // Deleting what is gone is not an error (a retried delete).
    store.delete(&Path::from("copy/b.bin")).await.unwrap();
}

#[test]
fn object_names_are_one_encoded_path_segment() {
    let store = GcsStore::new("http://127.0.0.1:9023/", "b", GcsAuth::Anonymous);
    let url = store
        .inner
        .object_url(&Path::from("run 1/s00000/part-00000.parquet"))
        .unwrap();
    assert_eq!(
        url.as_str(),
        "http://127.0.0.1:9023/storage/v1/b/b/o/run%201%2Fs00000%2Fpart-00000.parquet"
    );
    assert_eq!(
        store.inner.upload_url().unwrap().as_str(),
        "http://127.0.0.1:9023/upload/storage/v1/b/b/o"
    );
}

#[test]
fn resume_offsets_come_from_the_range_header() {
    let mut headers = reqwest::header::HeaderMap::new();
    assert_eq!(kept_bytes(&headers), 0);
    headers.insert("range", "bytes=0-262143".parse().unwrap());
    assert_eq!(kept_bytes(&headers), 262_144);
}

#[test]
fn download_ranges_are_inclusive_http_ranges() {
    let (header, range) = range_header(&GetRange::Bounded(10..20), 100).unwrap();
    assert_eq!((header.as_str(), range), ("bytes=10-19", 10..20));
    let (header, range) = range_header(&GetRange::Suffix(5), 100).unwrap();
    assert_eq!((header.as_str(), range), ("bytes=95-99", 95..100));
    let (header, range) = range_header(&GetRange::Offset(90), 100).unwrap();
    assert_eq!((header.as_str(), range), ("bytes=90-99", 90..100));
    assert!(range_header(&GetRange::Offset(200), 100).is_err());
}

#[test]
fn writes_map_their_mode_to_generation_preconditions() {
    assert!(put_preconditions(&PutMode::Overwrite).unwrap().is_empty());
    assert_eq!(
        put_preconditions(&PutMode::Create).unwrap(),
        vec![("ifGenerationMatch", "0".to_string())]
    );
    let update = PutMode::Update(object_store::UpdateVersion {
        e_tag: None,
        version: Some("17".into()),
    });
    assert_eq!(
        put_preconditions(&update).unwrap(),
        vec![("ifGenerationMatch", "17".to_string())]
    );
}
