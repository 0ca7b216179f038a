//! What `lvs` and `dmsetup` print, and what basyn makes of it: the LVs of an `lvs` JSON
//! report ([`parse_lvs`]), LVM's device-mapper names ([`dm_name`]), the premise of the
//! live path ([`premise`]: two thin volumes of one pool, of one size), a thin volume's and
//! a pool's `dmsetup table` ([`parse_thin_table`], [`parse_pool_table`]) and the pool's
//! `dmsetup status` ([`parse_pool_status`]).
//!
//! All of it is pure, tested on real output in `fixtures/lvm/` (its README says where
//! each file came from); [`super`] runs the commands and decides what to do with the
//! answers.

use std::fmt;

use serde::Deserialize;

/// Output that does not have the expected shape.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unexpected {what}: {why} in {text:?}")]
pub struct Unparsable {
    /// What was being read (`lvs report`, `thin table`...).
    pub what: &'static str,
    /// What is wrong with it.
    pub why: String,
    /// The offending text (at most its first 200 characters).
    pub text: String,
}

impl Unparsable {
    /// What is wrong with `text`, read as `what`.
    fn new(what: &'static str, why: impl Into<String>, text: &str) -> Unparsable {
        Unparsable { what, why: why.into(), text: text.trim().chars().take(200).collect() }
    }
}

/// One logical volume as `lvs` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lv {
    /// Volume group.
    pub vg: String,
    /// LV name.
    pub name: String,
    /// LV uuid.
    pub uuid: String,
    /// Size in bytes.
    pub size: u64,
    /// Segment type: `thin` for a thin volume (`linear`, `thin-pool`, ...).
    pub segtype: String,
    /// The thin pool LV, empty if none.
    pub pool: String,
    /// The thin pool's uuid, empty if none.
    pub pool_uuid: String,
    /// The thin device id inside the pool, for a thin volume.
    pub thin_id: Option<u64>,
}

impl fmt::Display for Lv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vg, self.name)
    }
}

/// The fields [`parse_lvs`] reads, in the order asked of `lvs -o`.
pub const LVS_FIELDS: &str = "vg_name,lv_name,lv_uuid,lv_size,segtype,pool_lv,pool_lv_uuid,thin_id";

/// `lvs --reportformat json` output: `{"report": [{"lv": [...]}]}`.
#[derive(Deserialize)]
struct Report {
    report: Vec<ReportPart>,
}

/// One report of it (one per command; `lvs` makes one).
#[derive(Deserialize)]
struct ReportPart {
    #[serde(default)]
    lv: Vec<LvRow>,
}

/// One LV's fields: lvs reports every value as a string, empty when it does not apply.
#[derive(Deserialize)]
struct LvRow {
    vg_name: String,
    lv_name: String,
    lv_uuid: String,
    lv_size: String,
    segtype: String,
    pool_lv: String,
    pool_lv_uuid: String,
    thin_id: String,
}

/// The LVs of `lvs --reportformat json --units b --nosuffix -o` [`LVS_FIELDS`] output.
pub fn parse_lvs(json: &str) -> Result<Vec<Lv>, Unparsable> {
    let bad = |why: String| Unparsable::new("lvs report", why, json);
    let report: Report = crate::json::parse(json).map_err(bad)?;
    let rows = report.report.into_iter().flat_map(|part| part.lv);
    rows.map(|row| {
        let size = row.lv_size.parse().map_err(|_| bad(format!("lv_size {:?} is not a byte count", row.lv_size)))?;
        let thin_id = match row.thin_id.as_str() {
            "" => None,
            id => Some(id.parse().map_err(|_| bad(format!("thin_id {id:?} is not a number")))?),
        };
        Ok(Lv {
            vg: row.vg_name,
            name: row.lv_name,
            uuid: row.lv_uuid,
            size,
            segtype: row.segtype,
            pool: row.pool_lv,
            pool_uuid: row.pool_lv_uuid,
            thin_id,
        })
    })
    .collect()
}

/// The device-mapper name LVM gives `vg`/`lv`: both joined by `-`, a `-` inside either
/// doubled (`vg-1`/`root-snap` is `vg--1-root--snap`). Layers append to it: `-tpool`.
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// Checks that the older snapshot `since` and the source can be diffed by their pool:
/// both thin volumes of the same pool, of the same size, and not the same LV. The
/// message names both LVs and says what differs.
pub fn premise(since: &Lv, source: &Lv) -> Result<(), String> {
    thin_volume("--since", since)?;
    thin_volume("the source", source)?;
    if since.vg != source.vg {
        return Err(format!(
            "--since {since} and the source {source} are in different volume groups ({} and {})",
            since.vg, source.vg
        ));
    }
    if since.pool != source.pool || since.pool_uuid != source.pool_uuid {
        return Err(format!(
            "--since {since} and the source {source} are in different thin pools ({} and {})",
            since.pool, source.pool
        ));
    }
    if since.size != source.size {
        return Err(format!(
            "--since {since} has {} bytes and the source {source} {}: the sizes differ",
            since.size, source.size
        ));
    }
    if since.uuid == source.uuid {
        return Err(format!("--since and the source are the same LV, {source}"));
    }
    Ok(())
}

/// Checks that `lv`, on `side` (`--since`, `the source`), is a thin volume.
pub fn thin_volume(side: &str, lv: &Lv) -> Result<(), String> {
    if lv.segtype == "thin" { Ok(()) } else { Err(format!("{side} {lv} is a {} LV, not a thin volume", lv.segtype)) }
}

/// A device number `major:minor`.
pub type DevNo = (u32, u32);

/// `major:minor` as the kernel prints it in tables.
fn parse_dev_no(s: &str) -> Option<DevNo> {
    let (major, minor) = s.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// A device-mapper table or status: exactly one line of one target of `kind`, split
/// into the words after `start length kind`, and the length.
fn one_target<'t>(what: &'static str, kind: &str, text: &'t str) -> Result<(u64, Vec<&'t str>), Unparsable> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return Err(Unparsable::new(what, "not exactly one line", text));
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["0", len, k, rest @ ..] if *k == kind => {
            let len = len.parse().map_err(|_| Unparsable::new(what, format!("length {len:?}"), text))?;
            Ok((len, rest.to_vec()))
        }
        [_, _, k, ..] => Err(Unparsable::new(what, format!("a {k} target, not {kind}"), text)),
        _ => Err(Unparsable::new(what, "too few words", text)),
    }
}

/// A `thin` target: `0 <sectors> thin <pool dev> <dev id> [<external origin dev>]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThinTable {
    /// Length in sectors.
    pub sectors: u64,
    /// The pool device (`VG-POOL-tpool`).
    pub pool: DevNo,
    /// The thin device id inside the pool.
    pub dev_id: u64,
    /// A read-only device that unprovisioned blocks are read from, as the table names it.
    pub external_origin: Option<String>,
}

/// The `dmsetup table` of a thin volume.
pub fn parse_thin_table(text: &str) -> Result<ThinTable, Unparsable> {
    const WHAT: &str = "thin table";
    let (sectors, words) = one_target(WHAT, "thin", text)?;
    let (pool, dev_id, origin) = match words.as_slice() {
        [pool, id] => (pool, id, None),
        [pool, id, origin] => (pool, id, Some(origin.to_string())),
        _ => return Err(Unparsable::new(WHAT, "not 2 or 3 arguments", text)),
    };
    Ok(ThinTable {
        sectors,
        pool: parse_dev_no(pool).ok_or_else(|| Unparsable::new(WHAT, format!("pool device {pool:?}"), text))?,
        dev_id: dev_id.parse().map_err(|_| Unparsable::new(WHAT, format!("device id {dev_id:?}"), text))?,
        external_origin: origin,
    })
}

/// A `thin-pool` target: `0 <sectors> thin-pool <metadata dev> <data dev>
/// <data block size> <low water mark> <#features> <features...>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolTable {
    /// Length in sectors.
    pub sectors: u64,
    /// The metadata device (LVM's `POOL_tmeta`).
    pub metadata: DevNo,
    /// The data device (LVM's `POOL_tdata`).
    pub data: DevNo,
    /// Data block size in sectors: the unit of thin mappings.
    pub block_sectors: u64,
    /// Free data blocks below which the pool raises an event.
    pub low_water_mark: u64,
    /// Feature arguments (`skip_block_zeroing`, `error_if_no_space`, ...).
    pub features: Vec<String>,
}

/// The `dmsetup table` of a `-tpool` device.
pub fn parse_pool_table(text: &str) -> Result<PoolTable, Unparsable> {
    const WHAT: &str = "thin-pool table";
    let (sectors, words) = one_target(WHAT, "thin-pool", text)?;
    let [metadata, data, block, low, count, features @ ..] = words.as_slice() else {
        return Err(Unparsable::new(WHAT, "fewer than 5 arguments", text));
    };
    let dev = |s: &str| parse_dev_no(s).ok_or_else(|| Unparsable::new(WHAT, format!("device {s:?}"), text));
    let number = |s: &str| s.parse::<u64>().map_err(|_| Unparsable::new(WHAT, format!("number {s:?}"), text));
    if number(count)? != features.len() as u64 {
        return Err(Unparsable::new(WHAT, format!("{count} features announced, {} given", features.len()), text));
    }
    let block_sectors = number(block)?;
    if block_sectors == 0 {
        return Err(Unparsable::new(WHAT, "data block size 0", text));
    }
    Ok(PoolTable {
        sectors,
        metadata: dev(metadata)?,
        data: dev(data)?,
        block_sectors,
        low_water_mark: number(low)?,
        features: features.iter().map(|f| f.to_string()).collect(),
    })
}

/// What `dmsetup status` says of a `-tpool` device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolStatus {
    /// The pool works: `<transaction id> <used>/<total metadata blocks>
    /// <used>/<total data blocks> <held metadata root> ro|rw|out_of_data_space ...`.
    Running {
        /// The pool's transaction id.
        transaction_id: u64,
        /// The metadata block of the held metadata snapshot; `None` for `-` (none held).
        held_root: Option<u64>,
        /// `rw`, `ro` or `out_of_data_space`.
        mode: String,
    },
    /// The kernel stopped the pool's metadata (`Fail` or `Error`, the word it printed).
    Failed(String),
}

/// The `dmsetup status` of a `-tpool` device.
pub fn parse_pool_status(text: &str) -> Result<PoolStatus, Unparsable> {
    const WHAT: &str = "thin-pool status";
    let (_, words) = one_target(WHAT, "thin-pool", text)?;
    match words.as_slice() {
        [word @ ("Fail" | "Error"), ..] => Ok(PoolStatus::Failed(word.to_string())),
        [transaction, metadata, data, held, mode, ..] => {
            let fraction =
                |s: &str| s.split_once('/').is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok());
            if !fraction(metadata) || !fraction(data) {
                return Err(Unparsable::new(WHAT, "block counts are not used/total", text));
            }
            let held_root = match *held {
                "-" => None,
                n => Some(n.parse().map_err(|_| Unparsable::new(WHAT, format!("held root {n:?}"), text))?),
            };
            Ok(PoolStatus::Running {
                transaction_id: transaction
                    .parse()
                    .map_err(|_| Unparsable::new(WHAT, format!("transaction id {transaction:?}"), text))?,
                held_root,
                mode: mode.to_string(),
            })
        }
        _ => Err(Unparsable::new(WHAT, "fewer than 5 fields", text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../../fixtures/lvm/", $name))
        };
    }

    fn lv(json: &str) -> Lv {
        let mut lvs = parse_lvs(json).expect("a parsable lvs report");
        assert_eq!(lvs.len(), 1);
        lvs.remove(0)
    }

    #[test]
    fn lvs_json_of_a_thin_snapshot_gives_its_pool_size_and_thin_id() {
        assert_eq!(
            lv(fixture!("lvs-since-root-snap1.json")),
            Lv {
                vg: "basynthinvg".into(),
                name: "root-snap1".into(),
                uuid: "Rann76-dEyT-zAeK-OmXR-rvft-va9A-W7hipT".into(),
                size: 16 << 20,
                segtype: "thin".into(),
                pool: "pool0".into(),
                pool_uuid: "C3J27X-DCG2-LmlZ-GEON-YlgC-tjfI-Z4SOcM".into(),
                thin_id: Some(2),
            }
        );
        assert_eq!(lv(fixture!("lvs-source-root-snap2.json")).thin_id, Some(3));
    }

    #[test]
    fn lvs_json_of_a_linear_lv_or_a_pool_has_no_thin_id() {
        let plain = lv(fixture!("lvs-linear.json"));
        assert_eq!((plain.segtype.as_str(), plain.pool.as_str(), plain.thin_id), ("linear", "", None));
        let pool = lv(fixture!("lvs-thin-pool.json"));
        assert_eq!((pool.segtype.as_str(), pool.size, pool.thin_id), ("thin-pool", 32 << 20, None));
    }

    #[test]
    fn lvs_json_that_found_nothing_lists_no_lv() {
        assert_eq!(parse_lvs(fixture!("lvs-image-file.json")), Ok(vec![]));
        assert_eq!(parse_lvs(fixture!("lvs-no-such-lv.json")), Ok(vec![]));
    }

    #[test]
    fn lvs_json_with_sizes_in_other_units_or_cut_short_is_unparsable() {
        let human = fixture!("lvs-linear.json").replace("\"8388608\"", "\"8.00m\"");
        let e = parse_lvs(&human).expect_err("8.00m is not a byte count");
        assert_eq!((e.what, e.why.as_str()), ("lvs report", "lv_size \"8.00m\" is not a byte count"));
        let cut = &fixture!("lvs-linear.json")[..120];
        assert_eq!(parse_lvs(cut).expect_err("cut short").what, "lvs report");
        assert!(parse_lvs("").is_err());
    }

    #[test]
    fn dm_names_double_the_dashes_inside_vg_and_lv() {
        // lvs resolved /dev/mapper/basynthinvg-root--snap2 to basynthinvg/root-snap2.
        let source = lv(fixture!("lvs-source-root-snap2.json"));
        assert_eq!(dm_name(&source.vg, &source.name), "basynthinvg-root--snap2");
        assert_eq!(dm_name("vg-1", "my-pool") + "-tpool", "vg--1-my--pool-tpool");
        assert_eq!(dm_name("pve", "data_tmeta"), "pve-data_tmeta");
    }

    #[test]
    fn a_thin_table_gives_the_pool_device_and_the_thin_device_id() {
        let want = ThinTable { sectors: 2097152, pool: (253, 5), dev_id: 1, external_origin: None };
        assert_eq!(parse_thin_table(fixture!("dmsetup-table-thin.txt")), Ok(want.clone()));
        let external = ThinTable { external_origin: Some("253:7".into()), ..want };
        assert_eq!(parse_thin_table("0 2097152 thin 253:5 1 253:7\n"), Ok(external));
    }

    #[test]
    fn a_table_that_is_not_one_thin_target_is_unparsable() {
        let linear = parse_thin_table("0 16384 linear 7:1 10240\n").expect_err("linear");
        assert_eq!(linear.why, "a linear target, not thin");
        let two = parse_thin_table("0 8 thin 253:5 1\n8 8 thin 253:5 1\n").expect_err("two lines");
        assert_eq!(two.why, "not exactly one line");
        assert_eq!(parse_thin_table("").expect_err("empty").why, "not exactly one line");
        assert_eq!(parse_thin_table("0 8 thin 253-5 1").expect_err("bad device").why, "pool device \"253-5\"");
    }

    #[test]
    fn a_pool_table_gives_the_metadata_device_and_the_data_block_size() {
        assert_eq!(
            parse_pool_table(fixture!("dmsetup-table-pool.txt")),
            Ok(PoolTable {
                sectors: 1638400,
                metadata: (253, 3),
                data: (253, 4),
                block_sectors: 512,
                low_water_mark: 0,
                features: vec!["error_if_no_space".into()],
            })
        );
        let miscounted = parse_pool_table("0 1638400 thin-pool 253:3 253:4 512 0 2 error_if_no_space\n");
        assert_eq!(miscounted.expect_err("2 announced").why, "2 features announced, 1 given");
        let thin = parse_pool_table(fixture!("dmsetup-table-thin.txt")).expect_err("a thin table");
        assert_eq!(thin.why, "a thin target, not thin-pool");
    }

    #[test]
    fn a_pool_status_gives_the_held_metadata_root_or_none() {
        let running = |held_root| PoolStatus::Running { transaction_id: 19, held_root, mode: "rw".into() };
        assert_eq!(parse_pool_status(fixture!("dmsetup-status-pool.txt")), Ok(running(None)));
        assert_eq!(parse_pool_status(fixture!("dmsetup-status-pool-held.txt")), Ok(running(Some(2000))));
        assert_eq!(parse_pool_status("0 2577285120 thin-pool Fail\n"), Ok(PoolStatus::Failed("Fail".into())));
        let garbled = parse_pool_status("0 2577285120 thin-pool 19 8886 629535/838960 - rw\n");
        assert_eq!(garbled.expect_err("no total").why, "block counts are not used/total");
    }

    #[test]
    fn two_snapshots_of_one_thin_volume_meet_the_premise() {
        let since = lv(fixture!("lvs-since-root-snap1.json"));
        assert_eq!(premise(&since, &lv(fixture!("lvs-source-root-snap2.json"))), Ok(()));
    }

    #[test]
    fn a_premise_failure_names_both_lvs_and_what_differs() {
        let since = lv(fixture!("lvs-since-root-snap1.json"));
        let verdict = |json| premise(&since, &lv(json)).expect_err("the premise fails");
        assert_eq!(
            verdict(fixture!("lvs-thin-bigger.json")),
            "--since basynthinvg/root-snap1 has 16777216 bytes and the source basynthinvg/big 33554432: the sizes differ"
        );
        assert_eq!(
            verdict(fixture!("lvs-thin-other-pool.json")),
            "--since basynthinvg/root-snap1 and the source basynthinvg/other are in different thin pools (pool0 and pool1)"
        );
        assert_eq!(
            verdict(fixture!("lvs-thin-other-vg.json")),
            "--since basynthinvg/root-snap1 and the source basynthinvg2/root are in different volume groups \
             (basynthinvg and basynthinvg2)"
        );
        assert_eq!(
            verdict(fixture!("lvs-linear.json")),
            "the source basynthinvg/plain is a linear LV, not a thin volume"
        );
        assert_eq!(
            premise(&lv(fixture!("lvs-thin-pool.json")), &since),
            Err("--since basynthinvg/pool0 is a thin-pool LV, not a thin volume".into())
        );
        assert_eq!(
            premise(&since, &since),
            Err("--since and the source are the same LV, basynthinvg/root-snap1".into())
        );
    }

    #[test]
    fn the_same_pool_name_with_another_uuid_is_another_pool() {
        let since = lv(fixture!("lvs-since-root-snap1.json"));
        let mut source = lv(fixture!("lvs-source-root-snap2.json"));
        source.pool_uuid = "u8jzPd-e0Ig-xLd6-Gncf-BAep-fJBd-0Kh8oO".into();
        assert!(premise(&since, &source).expect_err("pool uuids differ").contains("different thin pools"));
    }
}
