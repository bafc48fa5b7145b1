//! The array daemon's `Array` gRPC service: the admin operations of
//! [`ArrayAdmin`] on the wire. It translates between protobuf and the
//! plain types of [`crate::api`] and does nothing else: the rules of a
//! spec are the manager's (through [`crate::config::validate_spec`]), and
//! each [`AdminError`] maps to its one status code in `api`.
//!
//! Proto3 has no absent scalars, so zero stands for "the default" where
//! the message says so: `chunk` 0 is 512 KiB, `copies` 0 is 2,
//! `bitmap_region` 0 is the array's choice.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use nbdraid_proto::grpc::{self, array_server};

use crate::api::{
    AdminError, ArrayAdmin, ArraySpec, ArrayState, ArrayStatus, CheckReport, MemberStatus,
    Progress, Removal,
};
use crate::config::{DEFAULT_CHUNK, DEFAULT_COPIES, parse_level};

/// Returns the `Array` service over `admin`, as routes for the daemon's
/// gRPC server (served beside the `Throttle` service).
pub fn routes(admin: Arc<dyn ArrayAdmin>) -> tonic::service::Routes {
    tonic::service::Routes::new(array_server::ArrayServer::new(ArrayService::new(admin)))
}

/// The `Array` admin service.
pub struct ArrayService {
    admin: Arc<dyn ArrayAdmin>,
}

impl ArrayService {
    /// Returns the service over the daemon's arrays.
    pub fn new(admin: Arc<dyn ArrayAdmin>) -> Self {
        Self { admin }
    }
}

fn invalid(what: &str, value: impl std::fmt::Display) -> AdminError {
    AdminError::Invalid(format!("{what} {value} is out of range"))
}

/// Returns the spec a `CreateArray` request asks for; an unknown level is
/// refused here, every other rule by the manager.
pub fn spec_from_proto(p: grpc::ArraySpec) -> Result<ArraySpec, AdminError> {
    let level = parse_level(&p.level)?;
    let copies = match p.copies {
        0 => DEFAULT_COPIES,
        n => usize::try_from(n).map_err(|_| invalid("copies", n))?,
    };
    Ok(ArraySpec {
        name: p.name,
        level,
        chunk: if p.chunk == 0 { DEFAULT_CHUNK } else { p.chunk },
        copies,
        members: p.members,
        bitmap_region: (p.bitmap_region != 0).then_some(p.bitmap_region),
        force: p.force,
        overwrite: p.overwrite,
        spares: p.spares,
    })
}

/// Returns the request that asks for `spec`.
pub fn spec_to_proto(spec: &ArraySpec) -> grpc::ArraySpec {
    grpc::ArraySpec {
        name: spec.name.clone(),
        level: spec.level.to_string(),
        chunk: spec.chunk,
        copies: u32::try_from(spec.copies).unwrap_or(u32::MAX),
        members: spec.members.clone(),
        bitmap_region: spec.bitmap_region.unwrap_or(0),
        force: spec.force,
        overwrite: spec.overwrite,
        spares: spec.spares.clone(),
    }
}

/// Returns the message of a progress.
pub fn progress_to_proto(p: Progress) -> grpc::Progress {
    grpc::Progress {
        kind: p.kind,
        done: p.done,
        total: p.total,
        rate: p.rate,
        eta_secs: p.eta.map(|d| d.as_secs_f64()),
    }
}

/// Returns the progress a message carries.
pub fn progress_from_proto(p: grpc::Progress) -> Result<Progress, AdminError> {
    let eta = p
        .eta_secs
        .map(|s| Duration::try_from_secs_f64(s).map_err(|_| invalid("eta_secs", s)))
        .transpose()?;
    Ok(Progress {
        kind: p.kind,
        done: p.done,
        total: p.total,
        rate: p.rate,
        eta,
    })
}

/// Returns the message of a check report.
pub fn check_to_proto(c: CheckReport) -> grpc::CheckReport {
    grpc::CheckReport {
        running: c.running,
        progress: Some(progress_to_proto(c.progress)),
        mismatches: c.mismatches,
        first_mismatches: c.first_mismatches,
        errors: c.errors,
        repaired: c.repaired,
        repair: c.repair,
    }
}

/// Returns the check report a message carries.
pub fn check_from_proto(c: grpc::CheckReport) -> Result<CheckReport, AdminError> {
    let progress = c
        .progress
        .ok_or_else(|| AdminError::Invalid("a check report without progress".into()))?;
    Ok(CheckReport {
        running: c.running,
        progress: progress_from_proto(progress)?,
        mismatches: c.mismatches,
        first_mismatches: c.first_mismatches,
        errors: c.errors,
        repaired: c.repaired,
        repair: c.repair,
    })
}

fn member_to_proto(m: MemberStatus) -> grpc::MemberStatus {
    grpc::MemberStatus {
        slot: u32::try_from(m.slot).unwrap_or(u32::MAX),
        uri: m.uri,
        uuid: m.uuid,
        state: m.state,
        errors: m.errors,
        reads: m.reads,
        writes: m.writes,
        latency_us: m.latency_us,
    }
}

fn member_from_proto(m: grpc::MemberStatus) -> Result<MemberStatus, AdminError> {
    Ok(MemberStatus {
        slot: usize::try_from(m.slot).map_err(|_| invalid("slot", m.slot))?,
        uri: m.uri,
        uuid: m.uuid,
        state: m.state,
        errors: m.errors,
        reads: m.reads,
        writes: m.writes,
        latency_us: m.latency_us,
    })
}

/// Parses an array state as [`ArrayState::name`] spells it.
pub fn parse_state(s: &str) -> Result<ArrayState, AdminError> {
    [
        ArrayState::Clean,
        ArrayState::Active,
        ArrayState::Degraded,
        ArrayState::Failed,
    ]
    .into_iter()
    .find(|st| st.name() == s)
    .ok_or_else(|| AdminError::Invalid(format!("unknown array state {s:?}")))
}

/// Returns the message of an array's status.
pub fn status_to_proto(s: ArrayStatus) -> grpc::ArrayStatus {
    grpc::ArrayStatus {
        name: s.name,
        uuid: s.uuid,
        level: s.level.to_string(),
        layout: s.layout,
        chunk: s.chunk,
        copies: u32::try_from(s.copies).unwrap_or(u32::MAX),
        size: s.size,
        member_size: s.member_size,
        state: s.state.name().to_string(),
        events: s.events,
        bitmap_region: s.bitmap_region,
        bitmap_dirty: s.bitmap_dirty,
        members: s.members.into_iter().map(member_to_proto).collect(),
        sync: s.sync.map(progress_to_proto),
        check: s.check.map(check_to_proto),
        export: s.export,
        spares: s.spares,
        sync_rate: s.sync_rate,
    }
}

/// Returns the status a message carries (for clients of the service,
/// such as an array daemon stacked above this one).
pub fn status_from_proto(s: grpc::ArrayStatus) -> Result<ArrayStatus, AdminError> {
    Ok(ArrayStatus {
        name: s.name,
        uuid: s.uuid,
        level: parse_level(&s.level)?,
        layout: s.layout,
        chunk: s.chunk,
        copies: usize::try_from(s.copies).map_err(|_| invalid("copies", s.copies))?,
        size: s.size,
        member_size: s.member_size,
        state: parse_state(&s.state)?,
        events: s.events,
        bitmap_region: s.bitmap_region,
        bitmap_dirty: s.bitmap_dirty,
        members: s
            .members
            .into_iter()
            .map(member_from_proto)
            .collect::<Result<_, _>>()?,
        sync: s.sync.map(progress_from_proto).transpose()?,
        check: s.check.map(check_from_proto).transpose()?,
        export: s.export,
        spares: s.spares,
        sync_rate: s.sync_rate,
    })
}

#[tonic::async_trait]
impl array_server::Array for ArrayService {
    async fn create_array(
        &self,
        req: Request<grpc::ArraySpec>,
    ) -> Result<Response<grpc::ArrayStatus>, Status> {
        let spec = spec_from_proto(req.into_inner())?;
        let status = self.admin.create(spec).await?;
        Ok(Response::new(status_to_proto(status)))
    }

    async fn list_arrays(
        &self,
        _: Request<grpc::ListArraysRequest>,
    ) -> Result<Response<grpc::ListArraysReply>, Status> {
        let arrays = self.admin.list().into_iter().map(status_to_proto).collect();
        Ok(Response::new(grpc::ListArraysReply { arrays }))
    }

    async fn get_array_status(
        &self,
        req: Request<grpc::ArrayStatusRequest>,
    ) -> Result<Response<grpc::ArrayStatus>, Status> {
        let status = self.admin.status(&req.into_inner().name)?;
        Ok(Response::new(status_to_proto(status)))
    }

    async fn re_add(
        &self,
        req: Request<grpc::ReAddRequest>,
    ) -> Result<Response<grpc::ArrayStatus>, Status> {
        let r = req.into_inner();
        let slot = usize::try_from(r.slot).map_err(|_| invalid("slot", r.slot))?;
        let status = self.admin.re_add(&r.name, slot).await?;
        Ok(Response::new(status_to_proto(status)))
    }

    async fn check(
        &self,
        req: Request<grpc::CheckRequest>,
    ) -> Result<Response<grpc::CheckReport>, Status> {
        let r = req.into_inner();
        let report = self.admin.check(&r.name, r.repair)?;
        Ok(Response::new(check_to_proto(report)))
    }

    async fn replace(
        &self,
        req: Request<grpc::ReplaceRequest>,
    ) -> Result<Response<grpc::ArrayStatus>, Status> {
        let r = req.into_inner();
        let slot = usize::try_from(r.slot).map_err(|_| invalid("slot", r.slot))?;
        let status = self.admin.replace(&r.name, slot, &r.uri).await?;
        Ok(Response::new(status_to_proto(status)))
    }

    async fn add_spare(
        &self,
        req: Request<grpc::SpareRequest>,
    ) -> Result<Response<grpc::ArrayStatus>, Status> {
        let r = req.into_inner();
        let status = self.admin.add_spare(&r.name, &r.uri).await?;
        Ok(Response::new(status_to_proto(status)))
    }

    async fn remove(
        &self,
        req: Request<grpc::RemoveRequest>,
    ) -> Result<Response<grpc::ArrayStatus>, Status> {
        let r = req.into_inner();
        let what = match r.what {
            Some(grpc::remove_request::What::Spare(uri)) => Removal::Spare(uri),
            Some(grpc::remove_request::What::Slot(slot)) => {
                Removal::Member(usize::try_from(slot).map_err(|_| invalid("slot", slot))?)
            }
            None => {
                return Err(Status::invalid_argument(
                    "remove what? give a spare's URI or a member's slot",
                ));
            }
        };
        let status = self.admin.remove(&r.name, what).await?;
        Ok(Response::new(status_to_proto(status)))
    }

    async fn set_rate(
        &self,
        req: Request<grpc::SetRateRequest>,
    ) -> Result<Response<grpc::ArrayStatus>, Status> {
        let r = req.into_inner();
        let status = self.admin.set_rate(&r.name, r.rate)?;
        Ok(Response::new(status_to_proto(status)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Level;
    use futures::future::BoxFuture;
    use std::sync::Mutex;

    fn progress(kind: &str, eta: Option<u64>) -> Progress {
        Progress {
            kind: kind.into(),
            done: 3 << 30,
            total: 10 << 30,
            rate: 123_456_789.5,
            eta: eta.map(Duration::from_millis),
        }
    }

    fn status() -> ArrayStatus {
        ArrayStatus {
            name: "r6".into(),
            uuid: "8a1f".into(),
            level: Level::Raid6,
            layout: "left-symmetric".into(),
            chunk: 512 << 10,
            copies: 2,
            size: 20 << 30,
            member_size: 10 << 30,
            state: ArrayState::Degraded,
            events: 42,
            bitmap_region: 64 << 20,
            bitmap_dirty: 7,
            members: (0..4)
                .map(|slot| MemberStatus {
                    slot,
                    uri: format!("nbd://n{slot}:10809/v"),
                    uuid: format!("u{slot}"),
                    state: if slot == 2 { "recovering" } else { "active" }.into(),
                    errors: slot as u64,
                    reads: 1000 + slot as u64,
                    writes: 2000,
                    latency_us: 250,
                })
                .collect(),
            sync: Some(progress("recovery", Some(12_500))),
            check: Some(CheckReport {
                running: false,
                progress: progress("check", None),
                mismatches: 2,
                first_mismatches: vec![17, 99],
                errors: 1,
                repaired: 0,
                repair: false,
            }),
            export: "r6".into(),
            spares: vec!["nbd://n9:10809/v".into()],
            sync_rate: 50 << 20,
        }
    }

    #[test]
    fn status_round_trips() {
        let s = status();
        assert_eq!(status_from_proto(status_to_proto(s.clone())), Ok(s.clone()));
        let bare = ArrayStatus {
            sync: None,
            check: None,
            members: Vec::new(),
            state: ArrayState::Clean,
            ..s
        };
        assert_eq!(status_from_proto(status_to_proto(bare.clone())), Ok(bare));
        for st in [
            ArrayState::Clean,
            ArrayState::Active,
            ArrayState::Degraded,
            ArrayState::Failed,
        ] {
            assert_eq!(parse_state(st.name()), Ok(st));
        }
    }

    #[test]
    fn spec_round_trips_and_zero_means_default() {
        let spec = ArraySpec {
            name: "r10".into(),
            level: Level::Raid10,
            chunk: 64 << 10,
            copies: 3,
            members: vec!["nbd://a/x".into(), "nbd://b/x".into(), "nbd://c/x".into()],
            bitmap_region: Some(1 << 20),
            force: true,
            overwrite: true,
            spares: vec!["nbd://d/x".into()],
        };
        assert_eq!(spec_from_proto(spec_to_proto(&spec)), Ok(spec.clone()));
        let defaults = spec_from_proto(grpc::ArraySpec {
            name: "r5".into(),
            level: "raid5".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(defaults.chunk, DEFAULT_CHUNK);
        assert_eq!(defaults.copies, DEFAULT_COPIES);
        assert_eq!(defaults.bitmap_region, None);
        assert!(!defaults.force && !defaults.overwrite);
    }

    #[test]
    fn bad_input_is_invalid_argument() {
        let e = spec_from_proto(grpc::ArraySpec {
            name: "a".into(),
            level: "raid4".into(),
            ..Default::default()
        })
        .unwrap_err();
        let s = Status::from(e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message().contains("unknown RAID level \"raid4\""),
            "{s:?}"
        );
        let mut p = status_to_proto(status());
        p.state = "sleepy".into();
        assert!(status_from_proto(p).is_err());
        let mut p = status_to_proto(status());
        if let Some(c) = p.check.as_mut() {
            c.progress = None;
        }
        assert!(status_from_proto(p).is_err());
        let mut p = progress_to_proto(progress("x", None));
        p.eta_secs = Some(-1.0);
        assert!(progress_from_proto(p).is_err());
    }

    /// An admin that records what it was asked and answers from a fixture.
    #[derive(Default)]
    struct Fake {
        created: Mutex<Vec<ArraySpec>>,
        re_added: Mutex<Vec<(String, usize)>>,
    }

    impl ArrayAdmin for Fake {
        fn create(&self, spec: ArraySpec) -> BoxFuture<'_, Result<ArrayStatus, AdminError>> {
            Box::pin(async move {
                if spec.name == "taken" {
                    return Err(AdminError::Exists(spec.name));
                }
                self.created.lock().unwrap().push(spec);
                Ok(status())
            })
        }
        fn list(&self) -> Vec<ArrayStatus> {
            vec![status()]
        }
        fn status(&self, name: &str) -> Result<ArrayStatus, AdminError> {
            match name {
                "r6" => Ok(status()),
                _ => Err(AdminError::UnknownArray(name.into())),
            }
        }
        fn re_add(
            &self,
            name: &str,
            slot: usize,
        ) -> BoxFuture<'_, Result<ArrayStatus, AdminError>> {
            self.re_added.lock().unwrap().push((name.into(), slot));
            Box::pin(async { Err(AdminError::Refused("member 2 is active".into())) })
        }
        fn check(&self, name: &str, _repair: bool) -> Result<CheckReport, AdminError> {
            self.status(name)?
                .check
                .ok_or_else(|| AdminError::Internal("no check".into()))
        }
        fn replace(
            &self,
            name: &str,
            _slot: usize,
            _uri: &str,
        ) -> BoxFuture<'_, Result<ArrayStatus, AdminError>> {
            let r = self.status(name);
            Box::pin(async move { r })
        }
        fn add_spare(
            &self,
            name: &str,
            _uri: &str,
        ) -> BoxFuture<'_, Result<ArrayStatus, AdminError>> {
            let r = self.status(name);
            Box::pin(async move { r })
        }
        fn remove(
            &self,
            name: &str,
            _what: Removal,
        ) -> BoxFuture<'_, Result<ArrayStatus, AdminError>> {
            let r = self.status(name);
            Box::pin(async move { r })
        }
        fn set_rate(&self, name: &str, _rate: u64) -> Result<ArrayStatus, AdminError> {
            self.status(name)
        }
    }

    #[tokio::test]
    async fn service_translates_calls_and_errors() {
        use array_server::Array as _;
        let fake = Arc::new(Fake::default());
        let svc = ArrayService::new(fake.clone());
        let got = svc
            .create_array(Request::new(grpc::ArraySpec {
                name: "new".into(),
                level: "raid1".into(),
                members: vec!["nbd://a/x".into(), "nbd://b/x".into()],
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got, status_to_proto(status()));
        assert_eq!(fake.created.lock().unwrap()[0].level, Level::Raid1);
        let e = svc
            .create_array(Request::new(grpc::ArraySpec {
                name: "taken".into(),
                level: "raid1".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        let e = svc
            .create_array(Request::new(grpc::ArraySpec {
                name: "x".into(),
                level: "RAID5".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            fake.created.lock().unwrap().len() == 1,
            "refused before the manager"
        );

        let list = svc
            .list_arrays(Request::new(grpc::ListArraysRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.arrays.len(), 1);
        let e = svc
            .get_array_status(Request::new(grpc::ArrayStatusRequest {
                name: "nope".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("no array named \"nope\""));
        let e = svc
            .re_add(Request::new(grpc::ReAddRequest {
                name: "r6".into(),
                slot: 2,
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert_eq!(fake.re_added.lock().unwrap()[0], ("r6".to_string(), 2));
        let c = svc
            .check(Request::new(grpc::CheckRequest {
                name: "r6".into(),
                repair: false,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(c.mismatches, 2);
        assert_eq!(c.first_mismatches, vec![17, 99]);
    }
}
