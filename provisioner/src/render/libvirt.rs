//! libvirt network and domain definitions: typed specs, rendered to XML, and read back from
//! the XML libvirt reports so that "define if different" compares what we manage and ignores
//! what libvirt adds (UUIDs, PCI addresses, defaults).

use std::net::Ipv4Addr;

use super::xml::Element;
use crate::inventory::{Cluster, MacAddr, Vm};

/// Why libvirt's XML could not be read.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// Not XML.
    #[error("libvirt returned malformed XML: {0}")]
    Malformed(#[from] roxmltree::Error),
    /// A value we rely on is missing or of the wrong form.
    #[error("libvirt XML: {0}")]
    Field(String),
}

/// The NAT network. It has no DHCP: every VM's address is static in its cloud-init
/// network-config, so adding a VM never changes (and never restarts) the network; a
/// network that an older version defined with DHCP host entries is not redefined for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// Network name.
    pub name: String,
    /// Bridge device.
    pub bridge: String,
    /// Host address on the bridge.
    pub gateway: Ipv4Addr,
    /// Netmask.
    pub netmask: Ipv4Addr,
}

impl NetworkSpec {
    /// The network the inventory asks for.
    pub fn from_cluster(c: &Cluster) -> Self {
        Self {
            name: c.network.name.clone(),
            bridge: c.network.bridge.clone(),
            gateway: c.network.gateway,
            netmask: c.network.cidr.netmask(),
        }
    }

    /// The libvirt XML.
    pub fn to_xml(&self) -> String {
        self.to_xml_with_uuid(None)
    }

    /// The libvirt XML carrying `uuid`: redefining an existing object must keep its UUID.
    pub fn to_xml_with_uuid(&self, uuid: Option<&str>) -> String {
        Element::new("network")
            .child(Element::new("name").text(&self.name))
            .children(uuid.map(|u| Element::new("uuid").text(u)))
            .child(Element::new("forward").attr("mode", "nat"))
            .child(
                Element::new("bridge")
                    .attr("name", &self.bridge)
                    .attr("stp", "on")
                    .attr("delay", 0),
            )
            .child(
                Element::new("ip")
                    .attr("address", self.gateway)
                    .attr("netmask", self.netmask),
            )
            .to_xml()
    }

    /// Reads the managed fields back from libvirt's `net-dumpxml`.
    pub fn from_xml(xml: &str) -> Result<Self, XmlError> {
        let doc = roxmltree::Document::parse(xml)?;
        let root = doc.root_element();
        let ip = child(root, "ip")?;
        Ok(Self {
            name: text(child(root, "name")?)?,
            bridge: attr(child(root, "bridge")?, "name")?.to_owned(),
            gateway: parse_attr(ip, "address")?,
            netmask: parse_attr(ip, "netmask")?,
        })
    }
}

/// Where a VM's files live on the host.
pub fn overlay_path(image_dir: &str, vm: &str) -> String {
    format!("{image_dir}/{vm}.qcow2")
}

/// Where a VM's cloud-init seed ISO lives on the host.
pub fn seed_path(image_dir: &str, vm: &str) -> String {
    format!("{image_dir}/{vm}-seed.iso")
}

pub use crate::inventory::VirtType;

/// Boot a kernel directly instead of the disk's boot loader (used for test guests built with
/// debootstrap, whose root file system has no boot loader).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectKernel {
    /// Kernel image on the host.
    pub kernel: String,
    /// Initial ramdisk on the host.
    pub initrd: String,
    /// Kernel command line.
    pub cmdline: String,
}

/// One VM's domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// Hardware or software virtualisation.
    pub virt_type: VirtType,
    /// Direct kernel boot, if any.
    pub direct_kernel: Option<DirectKernel>,
    /// Domain name.
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// The qcow2 overlay.
    pub disk: String,
    /// The cloud-init seed ISO.
    pub seed: String,
    /// Interface MAC.
    pub mac: MacAddr,
    /// libvirt network the interface joins.
    pub network: String,
}

impl DomainSpec {
    /// The domain the inventory asks for `vm`.
    pub fn from_vm(c: &Cluster, vm: &Vm) -> Self {
        Self {
            virt_type: c.host.virt_type,
            direct_kernel: None,
            name: vm.name.to_string(),
            memory_mib: u64::from(vm.memory_gib) * 1024,
            vcpus: vm.vcpus,
            disk: overlay_path(&c.host.image_dir, vm.name.as_str()),
            seed: seed_path(&c.host.image_dir, vm.name.as_str()),
            mac: vm.mac,
            network: c.network.name.clone(),
        }
    }

    /// The libvirt XML (KVM, virtio disk and NIC, serial console, no graphics).
    pub fn to_xml(&self) -> String {
        self.to_xml_with_uuid(None)
    }

    /// The libvirt XML carrying `uuid`: redefining an existing domain must keep its UUID.
    pub fn to_xml_with_uuid(&self, uuid: Option<&str>) -> String {
        let mut os = Element::new("os").child(
            Element::new("type")
                .attr("arch", "x86_64")
                .attr("machine", "q35")
                .text("hvm"),
        );
        os = match &self.direct_kernel {
            Some(k) => os
                .child(Element::new("kernel").text(&k.kernel))
                .child(Element::new("initrd").text(&k.initrd))
                .child(Element::new("cmdline").text(&k.cmdline)),
            None => os.child(Element::new("boot").attr("dev", "hd")),
        };
        let cpu = (self.virt_type == VirtType::Kvm)
            .then(|| Element::new("cpu").attr("mode", "host-passthrough"));
        Element::new("domain")
            .attr("type", self.virt_type.as_str())
            .child(Element::new("name").text(&self.name))
            .children(uuid.map(|u| Element::new("uuid").text(u)))
            .child(
                Element::new("memory")
                    .attr("unit", "MiB")
                    .text(self.memory_mib),
            )
            .child(Element::new("vcpu").text(self.vcpus))
            .child(os)
            .child(
                Element::new("features")
                    .child(Element::new("acpi"))
                    .child(Element::new("apic")),
            )
            .children(cpu)
            .child(
                Element::new("devices")
                    .child(
                        Element::new("disk")
                            .attr("type", "file")
                            .attr("device", "disk")
                            .child(
                                Element::new("driver")
                                    .attr("name", "qemu")
                                    .attr("type", "qcow2"),
                            )
                            .child(Element::new("source").attr("file", &self.disk))
                            .child(
                                Element::new("target")
                                    .attr("dev", "vda")
                                    .attr("bus", "virtio"),
                            ),
                    )
                    .child(
                        Element::new("disk")
                            .attr("type", "file")
                            .attr("device", "cdrom")
                            .child(
                                Element::new("driver")
                                    .attr("name", "qemu")
                                    .attr("type", "raw"),
                            )
                            .child(Element::new("source").attr("file", &self.seed))
                            .child(
                                Element::new("target")
                                    .attr("dev", "sda")
                                    .attr("bus", "sata"),
                            )
                            .child(Element::new("readonly")),
                    )
                    .child(
                        Element::new("interface")
                            .attr("type", "network")
                            .child(Element::new("mac").attr("address", self.mac))
                            .child(Element::new("source").attr("network", &self.network))
                            .child(Element::new("model").attr("type", "virtio")),
                    )
                    .child(Element::new("serial").attr("type", "pty"))
                    .child(Element::new("console").attr("type", "pty"))
                    .child(
                        Element::new("channel").attr("type", "unix").child(
                            Element::new("target")
                                .attr("type", "virtio")
                                .attr("name", "org.qemu.guest_agent.0"),
                        ),
                    ),
            )
            .to_xml()
    }

    /// Reads the managed fields back from libvirt's `dumpxml`.
    pub fn from_xml(xml: &str) -> Result<Self, XmlError> {
        let doc = roxmltree::Document::parse(xml)?;
        let root = doc.root_element();
        let memory = child(root, "memory")?;
        let amount: u64 = text(memory)?
            .parse()
            .map_err(|_| XmlError::Field("memory is not a number".into()))?;
        let memory_mib = match memory.attribute("unit").unwrap_or("KiB") {
            "KiB" | "k" => amount / 1024,
            "MiB" | "M" => amount,
            "GiB" | "G" => amount * 1024,
            other => {
                return Err(XmlError::Field(format!(
                    "memory unit {other} is not handled"
                )))
            }
        };
        let devices = child(root, "devices")?;
        let disk_source = |device: &str| -> Result<String, XmlError> {
            devices
                .children()
                .filter(|n| n.has_tag_name("disk") && n.attribute("device") == Some(device))
                .find_map(|d| d.children().find(|n| n.has_tag_name("source")))
                .and_then(|s| s.attribute("file"))
                .map(str::to_owned)
                .ok_or_else(|| XmlError::Field(format!("no {device} with a file source")))
        };
        let iface = child(devices, "interface")?;
        let virt_type = match root.attribute("type") {
            Some("kvm") => VirtType::Kvm,
            Some("qemu") => VirtType::Qemu,
            other => {
                return Err(XmlError::Field(format!(
                    "domain type {other:?} is not handled"
                )))
            }
        };
        let os = child(root, "os")?;
        let direct_kernel = match os.children().find(|n| n.has_tag_name("kernel")) {
            Some(k) => Some(DirectKernel {
                kernel: text(k)?,
                initrd: child(os, "initrd").and_then(text).unwrap_or_default(),
                cmdline: child(os, "cmdline").and_then(text).unwrap_or_default(),
            }),
            None => None,
        };
        Ok(Self {
            virt_type,
            direct_kernel,
            name: text(child(root, "name")?)?,
            memory_mib,
            vcpus: text(child(root, "vcpu")?)?
                .parse()
                .map_err(|_| XmlError::Field("vcpu is not a number".into()))?,
            disk: disk_source("disk")?,
            seed: disk_source("cdrom")?,
            mac: parse_attr(child(iface, "mac")?, "address")?,
            network: attr(child(iface, "source")?, "network")?.to_owned(),
        })
    }
}

/// The `<uuid>` of a network or domain definition, if any.
pub fn uuid_of(xml: &str) -> Result<Option<String>, XmlError> {
    let doc = roxmltree::Document::parse(xml)?;
    Ok(doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("uuid"))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_owned()))
}

fn child<'a, 'i>(
    node: roxmltree::Node<'a, 'i>,
    name: &str,
) -> Result<roxmltree::Node<'a, 'i>, XmlError> {
    node.children()
        .find(|n| n.has_tag_name(name))
        .ok_or_else(|| XmlError::Field(format!("<{}> has no <{name}>", node.tag_name().name())))
}

fn attr<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Result<&'a str, XmlError> {
    node.attribute(name).ok_or_else(|| {
        XmlError::Field(format!(
            "<{}> has no {name} attribute",
            node.tag_name().name()
        ))
    })
}

fn parse_attr<T: std::str::FromStr>(
    node: roxmltree::Node<'_, '_>,
    name: &str,
) -> Result<T, XmlError> {
    let v = attr(node, name)?;
    v.parse().map_err(|_| {
        XmlError::Field(format!(
            "<{}> {name}=`{v}` is malformed",
            node.tag_name().name()
        ))
    })
}

fn text(node: roxmltree::Node<'_, '_>) -> Result<String, XmlError> {
    node.text()
        .map(|t| t.trim().to_owned())
        .ok_or_else(|| XmlError::Field(format!("<{}> is empty", node.tag_name().name())))
}
