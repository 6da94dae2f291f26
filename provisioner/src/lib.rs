//! The provisioner plans and builds the cluster that hosts turnd: one libvirt host with a NAT
//! network, Ubuntu VMs booted from a cloud image with cloud-init, and Kubernetes (kubeadm,
//! containerd, Cilium in place of kube-proxy) on them.
//!
//! Layout:
//! - [`inventory`]: the typed `cluster.toml`, parsed with unknown keys refused, then validated
//!   with file, line and key in every error; [`secrets`] come from the environment or `.env`.
//! - [`exec`]: the [`exec::Transport`] trait — local, SSH (ControlMaster, jump through the
//!   host), a recording fake, and a persistent `virsh` session for libvirt's test driver;
//!   [`exec::redact`] masks credentials in the `-v` log, [`exec::tunnel`] forwards a port to
//!   the API server through the host.
//! - [`render`]: every generated file from typed data (libvirt XML, cloud-init, containerd,
//!   kubeadm, Cilium values, sysctl/modules).
//! - [`plan`]: typed actions, plans (disruptive actions marked and confirmed), the run lock,
//!   and the applier that records progress.
//! - [`phases`]: each phase as gather (observe) → plan (pure) → apply.
//! - [`k8s`]: turnd's Kubernetes objects (typed k8s-openapi), rendered and server-side applied
//!   ([`k8s::applier`]).
//! - [`hostnet`]: the host's iptables chains, systemd unit and drift check.
//! - [`image`]: turnd's image without a registry: built with podman or buildah, saved as an
//!   OCI archive, imported into the workers' containerd.
//! - [`dns`] and [`acme`]: Cloudflare DNS records and the ACME DNS-01 certificate.
//! - [`phases::monitoring`] with [`render::monitoring`]: kube-prometheus-stack by Helm, turnd's
//!   PodMonitor, dashboard and alert rules (`deploy/monitoring/`), e-mail alerts via SendGrid.
//!
//! What it leaves out: Kubernetes tools (Helm, kubeadm, the API server) and Grafana cannot run
//! in tests, so their command lines and configs are golden-tested and the Kubernetes API is a
//! fake server in tests; Prometheus, promtool and amtool are real.
#![forbid(unsafe_code)]

pub mod acme;
pub mod cli;
pub mod dns;
pub mod exec;
pub mod hostnet;
pub mod image;
pub mod inventory;
pub mod k8s;
pub mod phases;
pub mod plan;
pub mod render;
pub mod secrets;
