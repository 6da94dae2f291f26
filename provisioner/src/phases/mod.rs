//! The phases. Each one gathers facts (read-only commands), computes a [`Plan`] from them with
//! a pure function, and leaves applying to [`crate::plan::apply`].

pub mod apt;
pub mod facts;
pub mod host;
pub mod hostnet;
pub mod k8s;
pub mod monitoring;
pub mod turnd;
pub mod virsh;
pub mod vms;

use crate::exec::ExecError;
use crate::inventory::Cluster;
use crate::plan::{PhaseId, Plan, Transports};

/// How long `vms` waits for a started VM's SSH and cloud-init by default.
pub const VM_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Knobs that are not part of the inventory.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Debian packages the host needs.
    pub host_packages: Vec<String>,
    /// Boot the VMs' kernel directly (test guests without a boot loader); `None` in production.
    pub direct_kernel: Option<crate::render::libvirt::DirectKernel>,
    /// The Kubernetes API for the `turnd` phase; `None`: `$KUBECONFIG`.
    pub kube_api: Option<turnd::KubeApi>,
    /// turnd's REST-API auth secret (from [`crate::secrets::Secrets`]); `None`:
    /// `TURND_AUTH_SECRET` or `COTURN_AUTH_SECRET` from the process environment.
    pub auth_secret: Option<crate::k8s::Sensitive>,
    /// How long the `turnd` phase waits for its Deployments' rollout; `None`: it does not wait.
    pub rollout_timeout: Option<std::time::Duration>,
    /// Whether `host` installs the certificate renewal timer (systemd). Off only where the
    /// host has no systemd (libvirt's test driver, the slow-tier namespace).
    pub renew_timer: bool,
    /// The `.env` file phases read secrets from after the environment (`monitoring`:
    /// `GRAFANA_ADMIN_PASSWORD`, `SENDGRID_API_KEY`); `None`: the environment only.
    pub dotenv: Option<std::path::PathBuf>,
    /// After `vms` starts a VM, wait this long at most for SSH and cloud-init before the next
    /// phase runs in it; `None`: do not wait (tests without VM transports).
    pub vm_ready_timeout: Option<std::time::Duration>,
    /// What earlier phases of this run will have done by the time this one applies (set by
    /// `plan` over several phases on a fresh host).
    pub ahead: Ahead,
    /// Passwords of the inventory's `auth.users` given by `password_env`, by user name (from
    /// `.env`; the process environment is asked too).
    pub user_passwords: std::collections::BTreeMap<String, crate::k8s::Sensitive>,
    /// The certificate (names, store, renewal window, ACME directory): while the TLS Secret is
    /// missing, the `turnd` phase deploys the stored certificate when it can be reused, else
    /// issues one first (with [`Settings::acme_dns`]); `None`: it leaves the Secret to
    /// `cert deploy`.
    pub acme: Option<crate::acme::AcmeSettings>,
    /// The DNS API for the DNS-01 records; `None`: no certificate is issued in this run.
    pub acme_dns: Option<crate::dns::CloudflareClient>,
}

/// What the earlier phases of one `plan` run will have done when a later phase applies: a
/// later phase plans those VMs as fresh instead of asking them (they do not exist yet).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ahead {
    /// VMs that `vms` creates or starts in this run.
    pub vms: std::collections::BTreeSet<String>,
    /// `k8s-master` runs `kubeadm init` in this run.
    pub cluster: bool,
}

impl Ahead {
    /// Records what `plan` will have done.
    pub fn note(&mut self, plan: &Plan) {
        for a in &plan.actions {
            match (&a.kind, &a.target) {
                (crate::plan::ActionKind::WaitReady { .. }, crate::plan::Target::Vm(vm)) => {
                    self.vms.insert(vm.clone());
                }
                (crate::plan::ActionKind::Steps(steps), _) => {
                    let init = steps.iter().any(|s| {
                        matches!(s, crate::plan::Step::Run(c)
                            if c.program == "kubeadm" && c.args.first().is_some_and(|a| a == "init"))
                    });
                    self.cluster |= init;
                }
                _ => {}
            }
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            host_packages: [
                "qemu-kvm",
                "libvirt-daemon-system",
                "libvirt-clients",
                "qemu-utils",
                "cloud-image-utils",
                "genisoimage",
                "curl",
            ]
            .map(str::to_owned)
            .to_vec(),
            direct_kernel: None,
            kube_api: None,
            auth_secret: None,
            rollout_timeout: Some(turnd::ROLLOUT_TIMEOUT),
            renew_timer: true,
            dotenv: None,
            vm_ready_timeout: Some(VM_READY_TIMEOUT),
            ahead: Ahead::default(),
            user_passwords: std::collections::BTreeMap::new(),
            acme: None,
            acme_dns: None,
        }
    }
}

/// Everything a phase needs.
#[derive(Debug)]
pub struct Context<'a> {
    /// The validated inventory.
    pub cluster: &'a Cluster,
    /// Where commands run.
    pub transports: &'a Transports,
    /// Settings.
    pub settings: &'a Settings,
}

/// Why a phase could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    /// Gathering facts failed.
    #[error("phase {phase}: gathering facts: {source}")]
    Gather {
        /// The phase.
        phase: PhaseId,
        /// The failing command.
        source: ExecError,
    },
    /// libvirt returned XML we cannot read.
    #[error("phase {phase}: {source}")]
    Xml {
        /// The phase.
        phase: PhaseId,
        /// What was wrong.
        source: crate::render::libvirt::XmlError,
    },
    /// Some tool's output could not be read.
    #[error("phase {phase}: cannot read the output of `{command}`: {reason}")]
    Output {
        /// The phase.
        phase: PhaseId,
        /// The command.
        command: String,
        /// What was wrong.
        reason: String,
    },
    /// The phase belongs to a later version.
    #[error("phase {0} is not implemented in this version")]
    NotImplemented(PhaseId),
    /// The `[[turnd]]` instances cannot be forwarded by the host.
    #[error("phase {phase}: {source}")]
    HostNet {
        /// The phase.
        phase: PhaseId,
        /// What is wrong.
        source: crate::hostnet::HostNetError,
    },
    /// turnd's Kubernetes objects could not be built, or the API server refused a dry run.
    #[error("phase {phase}: {source}")]
    K8s {
        /// The phase.
        phase: PhaseId,
        /// What went wrong.
        source: crate::k8s::K8sError,
    },
    /// No Kubernetes API is configured.
    #[error("phase {phase}: no Kubernetes API: set KUBECONFIG to a kubeconfig of the cluster, or let the provisioner reach the master's API through the host (that needs the cluster to exist and the master's admin.conf readable over SSH)")]
    NoKubeApi {
        /// The phase.
        phase: PhaseId,
    },
    /// The auth secret is missing.
    #[error("phase {phase}: missing secret TURND_AUTH_SECRET (the old name COTURN_AUTH_SECRET is accepted too)")]
    NoAuthSecret {
        /// The phase.
        phase: PhaseId,
    },
    /// A secret the phase needs is missing.
    #[error("phase {phase}: {source}")]
    Secret {
        /// The phase.
        phase: PhaseId,
        /// Which one.
        source: crate::secrets::SecretError,
    },
    /// The locally built image's archive is missing, unreadable or holds another image.
    #[error("phase {phase}: {source}")]
    Image {
        /// The phase.
        phase: PhaseId,
        /// What is wrong.
        source: crate::image::ImageError,
    },
    /// A VM has no transport.
    #[error("phase {phase}: {source}")]
    Transport {
        /// The phase.
        phase: PhaseId,
        /// What is missing.
        source: crate::plan::NoTransport,
    },
}

/// Gathers facts for `phase` and plans it.
pub fn plan(phase: PhaseId, ctx: &Context<'_>) -> Result<Plan, PhaseError> {
    match phase {
        PhaseId::Host => {
            let facts = host::gather(ctx)?;
            Ok(host::plan(ctx.cluster, ctx.settings, &facts))
        }
        PhaseId::Vms => {
            let facts = vms::gather(ctx)?;
            Ok(vms::plan(ctx.cluster, ctx.settings, &facts))
        }
        PhaseId::K8sCommon => {
            let facts = k8s::gather_common(ctx)?;
            Ok(k8s::plan_common(ctx.cluster, &facts))
        }
        PhaseId::K8sMaster => {
            let facts = k8s::gather_master(ctx)?;
            Ok(k8s::plan_master(ctx.cluster, &facts))
        }
        PhaseId::K8sWorkers => {
            let facts = k8s::gather_workers(ctx)?;
            Ok(k8s::plan_workers(ctx.cluster, &facts))
        }
        PhaseId::HostKubectl => {
            let facts = k8s::gather_host_kubectl(ctx)?;
            Ok(k8s::plan_host_kubectl(ctx.cluster, &facts))
        }
        PhaseId::Turnd => {
            let (apply, facts) = turnd::gather(ctx, &crate::secrets::ProcessEnv)?;
            Ok(turnd::plan(apply, &facts, ctx.settings.rollout_timeout))
        }
        PhaseId::HostNetworking => {
            let want = hostnet::desired(ctx)?;
            let facts = hostnet::gather(ctx, &want)?;
            Ok(hostnet::plan(&want, &facts))
        }
        PhaseId::Monitoring => monitoring::plan_phase(ctx, &crate::secrets::ProcessEnv),
    }
}

/// Plans `phases` in order as one run applies them, without applying: each later phase plans
/// what an earlier one creates (a VM, the cluster) as fresh instead of asking for it, so
/// `plan --all` works on a fresh host.
///
/// # Errors
/// The first phase that cannot be planned.
pub fn plan_in_order(phases: &[PhaseId], ctx: &Context<'_>) -> Result<Vec<Plan>, PhaseError> {
    let mut settings = ctx.settings.clone();
    let mut plans = Vec::with_capacity(phases.len());
    for &phase in phases {
        let p = plan(
            phase,
            &Context {
                settings: &settings,
                ..*ctx
            },
        )?;
        settings.ahead.note(&p);
        plans.push(p);
    }
    Ok(plans)
}

/// Gathers and plans the host-networking teardown (run it before [`plan_teardown`]: the
/// forwards point at the VMs).
pub fn plan_teardown_hostnet(ctx: &Context<'_>) -> Result<Plan, PhaseError> {
    Ok(hostnet::plan_teardown(&hostnet::gather_teardown(ctx)?))
}

/// Gathers and plans the teardown: with `keep_vms`, `kubeadm reset` on every VM that has
/// joined; otherwise the domains, their disks and seeds, and the network are removed.
pub fn plan_teardown(ctx: &Context<'_>, keep_vms: bool) -> Result<Plan, PhaseError> {
    if keep_vms {
        let facts = k8s::gather_reset(ctx)?;
        Ok(k8s::plan_reset(ctx.cluster, &facts))
    } else {
        let vm_facts = vms::gather(ctx)?;
        let host_facts = host::gather_network(ctx)?;
        Ok(vms::plan_teardown(ctx.cluster, &vm_facts, &host_facts))
    }
}
