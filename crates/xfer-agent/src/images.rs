//! The agent's use of `xfer_runtime::image`: describing a container's image for the
//! wire, moving only the blobs a destination lacks, and recreating the image there.

use std::collections::BTreeMap;
use std::path::Path;

use xfer_proto::v1::BlobDescriptor as WireBlob;
use xfer_runtime::containerd::Containerd;
use xfer_runtime::image::{self, BlobDescriptor, MEDIA_TYPE_LAYER_TAR};
use xfer_runtime::RuntimeError;

/// An image as the protocol carries it.
#[derive(Debug, Clone)]
pub struct ImageBlobs {
    pub manifest: WireBlob,
    /// Config first, then the layers in order.
    pub blobs: Vec<WireBlob>,
    /// Top chain id of the unpacked layers.
    pub chain_id: String,
}

fn to_wire(d: &BlobDescriptor) -> WireBlob {
    WireBlob {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
    }
}

fn from_wire(d: &WireBlob) -> Result<BlobDescriptor, RuntimeError> {
    if d.size < 0 || !d.digest.starts_with("sha256:") || d.media_type.is_empty() {
        return Err(RuntimeError::Invalid(format!(
            "malformed blob descriptor {d:?}"
        )));
    }
    Ok(BlobDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as u64,
    })
}

/// The image `name` on this node, or `None`.
pub async fn info(rt: &Containerd, name: &str) -> Result<Option<ImageBlobs>, RuntimeError> {
    let ns = &rt.config().namespace;
    Ok(image::image_info(&rt.client(), ns, name).await?.map(|i| {
        let mut blobs = vec![to_wire(&i.config)];
        blobs.extend(i.layers.iter().map(to_wire));
        ImageBlobs {
            manifest: to_wire(&i.manifest),
            blobs,
            chain_id: i.chain_id,
        }
    }))
}

/// For each digest, whether this node's content store has it.
pub async fn has_blobs(rt: &Containerd, digests: &[String]) -> Result<Vec<bool>, RuntimeError> {
    image::has_blobs(&rt.client(), &rt.config().namespace, digests).await
}

/// Copies a blob out of the content store into a file.
pub async fn read_blob_to_file(
    rt: &Containerd,
    digest: &str,
    path: &Path,
) -> Result<(), RuntimeError> {
    let bytes = image::read_blob(&rt.client(), &rt.config().namespace, digest).await?;
    std::fs::write(path, bytes).map_err(|source| RuntimeError::Io {
        op: "write blob",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a received blob file into the content store (containerd checks its digest),
/// protected by `lease` until the image references it.
pub async fn write_blob_file(
    rt: &Containerd,
    lease: &str,
    desc: &WireBlob,
    path: &Path,
) -> Result<(), RuntimeError> {
    let desc = from_wire(desc)?;
    let bytes = std::fs::read(path).map_err(|source| RuntimeError::Io {
        op: "read blob",
        path: path.to_path_buf(),
        source,
    })?;
    image::write_blob(
        &rt.client(),
        &rt.config().namespace,
        Some(lease),
        &desc,
        &bytes,
        &BTreeMap::new(),
    )
    .await?;
    Ok(())
}

/// Creates (or updates) the image record from blobs in the content store and unpacks
/// it; returns the top chain id, the parent of the container's snapshot.
pub async fn ensure_image(
    rt: &Containerd,
    name: &str,
    manifest: &WireBlob,
) -> Result<String, RuntimeError> {
    let manifest = from_wire(manifest)?;
    let imported = image::import_from_content(
        &rt.client(),
        &rt.config().namespace,
        name,
        &manifest,
        &rt.config().snapshotter,
    )
    .await?;
    Ok(imported.chain_id)
}

/// Applies the writable-layer diff tar at `path` to the container's snapshot `key`.
pub async fn apply_diff(
    rt: &Containerd,
    lease: &str,
    key: &str,
    path: &Path,
) -> Result<(), RuntimeError> {
    let bytes = std::fs::read(path).map_err(|source| RuntimeError::Io {
        op: "read writable-layer diff",
        path: path.to_path_buf(),
        source,
    })?;
    let desc = BlobDescriptor::of(MEDIA_TYPE_LAYER_TAR, &bytes);
    image::write_blob(
        &rt.client(),
        &rt.config().namespace,
        Some(lease),
        &desc,
        &bytes,
        &BTreeMap::new(),
    )
    .await?;
    rt.apply_layer(key, desc.to_containerd()).await
}

/// A lease that keeps a migration's blobs from garbage collection.
pub async fn lease(rt: &Containerd) -> Result<image::Lease, RuntimeError> {
    image::Lease::create(
        &rt.client(),
        &rt.config().namespace,
        std::time::Duration::from_secs(3600),
    )
    .await
}

/// Ends a lease.
pub async fn end_lease(rt: &Containerd, lease: image::Lease) {
    if let Err(e) = lease.delete(&rt.client()).await {
        tracing::warn!(error = %e, "could not delete a migration lease (it expires by itself)");
    }
}
