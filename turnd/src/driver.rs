//! The IO driver around the sans-IO core (placeholder until the real driver lands).

/// Runs the server with `settings` until it is stopped.
///
/// # Errors
/// Always, for now: the driver is not written yet.
pub async fn serve(settings: crate::config::Settings) -> anyhow::Result<()> {
    let _ = settings;
    anyhow::bail!("driver not yet written")
}
